"""Learning curves of dqn_equi_bullet.py: equivariant vs CNN Q network on Block Pulling, several seeds each.

Runs the training script once per (model, seed) as a user would (its own process, its TensorBoard run under
<runs-dir>/runs), at most --parallel at a time, then summarises the runs with
`python -m cleanrl_equi.tools.plot_runs <runs-dir> --out <results> --group-by model` (curves of the seed mean with a
95% interval, summary.md / summary.csv) and writes <results>/runs.json: the configuration, each seed's last and
best evaluation success rate, each run's wall time and the hardware.

The default configuration is the CPU preset: the paper's DQN settings (dpos 0.02, dtheta pi/16, batch 32, gamma 0.95,
100 demos, Huber loss, soft target tau 0.01, greedy acting, 5 envs, 20k gradient steps) on 32 px images with
n_hidden 16 instead of 128 px and 128, a learning rate of 1e-3 instead of 1e-4, and BulletArm's smaller scene (0.3 m
workspace, 8 cm blocks, 50-step episodes) instead of the paper's (0.4 m, 10 cm blocks, 100 steps), so that a run
takes well under an hour on a CPU core.

    # the CPU preset: 2 models x 3 seeds, 2 runs at a time (about 80 min on a shared 2-core CPU)
    uv run python benchmarks/dqn_learning.py --device cpu --parallel 2 --seeds 1,2,3 --tag _cpu
    # the paper's settings on a GPU node (3 seeds each; the script's defaults: 128 px, n_hidden 128, lr 1e-4)
    uv run python benchmarks/dqn_learning.py --device cuda --parallel 6 --seeds 1,2,3 --image-size 128 \\
        --n-hidden 128 --learning-rate 1e-4 --workspace-size 0.4 --max-steps 100 --paper-tasks \\
        --eval-frequency 500 --eval-episodes 100 --tag _gpu
    # only summarise runs that already exist
    uv run python benchmarks/dqn_learning.py --collect-only --runs-dir benchmarks/dqn_runs --tag _cpu --overwrite
Extra flags after `--` go to every training run. Each run is named <env>__dqn_<model>__<seed>__benchmark, so the same
command with a larger --total-timesteps continues the finished runs from their resume files (any other change of
settings is refused by the script: use another --runs-dir). Existing results are replaced only when --out names them
or with --overwrite.
"""

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (REPO, Job, Launch, Output, cli, device_flags, machine_info, results_path, run_jobs,  # noqa: E402
                    thread_env)

PAPER = {"source": "Wang, Walters, Platt, SO(2)-Equivariant Reinforcement Learning, ICLR 2022 (DQN curves, Block "
                   "Pulling, 128 px, 4 seeds, read off the published figure; y = evaluation discounted return)",
         "equi": "about 0.28 at 10k and 0.4 at 17.5-20k gradient steps", "cnn": "about 0.3 at 20k gradient steps"}


@dataclass
class Args(Output, Launch):
    env_id: str = "cleanrl_equi/BlockPulling-v0"
    """the manipulation task"""
    models: str = "equi,cnn"
    """comma-separated models: equi, cnn"""
    seeds: str = "1,2,3"
    """comma-separated seeds"""
    total_timesteps: int = 100000
    """env steps per run (5 envs: one gradient step per 5 env steps; the paper's 20k gradient steps)"""
    image_size: int = 32
    """observation size in pixels (the paper: 128)"""
    n_hidden: int = 16
    """network width n (the paper: 128)"""
    learning_rate: float = 1e-3
    """Adam learning rate (the paper: 1e-4)"""
    workspace_size: float = 0.3
    """workspace side in metres (the paper and the script's default: 0.4)"""
    max_steps: int = 50
    """episode length limit (the paper and the script's default: 100)"""
    paper_tasks: bool = False
    """the paper's task sizes (Block Pulling: 10 cm blocks; the script's default) instead of BulletArm's (8 cm)"""
    eval_frequency: int = 250
    """gradient steps between evaluations"""
    eval_episodes: int = 50
    """greedy episodes per evaluation"""
    runs_dir: str = os.path.join(REPO, "benchmarks", "dqn_runs")
    """folder of the runs (runs/, with one .log per run); git-ignored"""
    collect_only: bool = False
    """skip training; summarise the runs already in --runs-dir"""


def training_flags(opts: Args) -> list[str]:
    return ["--env-id", opts.env_id, "--total-timesteps", str(opts.total_timesteps), "--image-size",
            str(opts.image_size), "--n-hidden", str(opts.n_hidden), "--learning-rate", str(opts.learning_rate),
            "--workspace-size", str(opts.workspace_size), "--max-steps", str(opts.max_steps),
            "--paper-tasks" if opts.paper_tasks else "--no-paper-tasks",
            "--eval-frequency", str(opts.eval_frequency), "--eval-episodes", str(opts.eval_episodes)]


def run_all(opts: Args, extra: list[str]) -> dict[str, float]:
    """Start the runs, at most --parallel at a time; {run label: wall seconds}."""
    jobs = []
    for seed in opts.seeds.split(","):
        for model in opts.models.split(","):
            run_name = f"{opts.env_id.replace('/', '_')}__dqn_{model}__{seed}__benchmark"
            cmd = [sys.executable, os.path.join(REPO, "dqn_equi_bullet.py"), "--model", model, "--seed", seed,
                   "--exp-name", f"dqn_{model}", "--run-name", run_name, *training_flags(opts),
                   *device_flags(opts.device), *extra]
            log = os.path.join(opts.runs_dir, "runs", f"dqn_{model}_{seed}_to_{opts.total_timesteps}.log")
            jobs.append(Job(f"dqn_{model} seed {seed}", cmd, log, opts.runs_dir, thread_env(opts.threads)))
    results = run_jobs(jobs, opts.parallel, hint="--collect-only summarises the runs that finished")
    return {r.job.name: r.seconds for r in results}


def read_evaluations(runs_dir: str) -> dict[str, dict[int, dict]]:
    """{experiment: {seed: {"model", "steps", "success", "return", "wall_seconds"}}} from every run's eval scalars
    (the experiment is the run's --exp-name, dqn_<model> here; wall_seconds runs from the first scalar to the last
    evaluation, so it includes any pause between a run and its continuation)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs: dict[str, dict[int, dict]] = {}
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "runs", "*__*__*__*"))):
        with open(os.path.join(run_dir, "run.json")) as f:
            run_args = json.load(f)["args"]
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "eval/success_rate" not in tags:
            continue
        start = min(acc.Scalars(tag)[0].wall_time for tag in tags)
        success = acc.Scalars("eval/success_rate")
        runs.setdefault(run_args["exp_name"], {})[int(run_args["seed"])] = {
            "model": run_args["model"], "steps": [int(e.value) for e in acc.Scalars("eval/gradient_steps")],
            "success": [e.value for e in success],
            "return": [e.value for e in acc.Scalars("eval/discounted_return")],
            "wall_seconds": success[-1].wall_time - start,
        }
    return runs


def main():
    opts, extra = cli(Args, __doc__, passthrough=True)
    opts.runs_dir = os.path.abspath(opts.runs_dir)
    path = results_path(opts, "dqn_learning", folder=True)
    started = time.time()
    job_seconds = {} if opts.collect_only else run_all(opts, extra)
    runs = read_evaluations(opts.runs_dir)
    if not runs:
        raise SystemExit(f"no runs with evaluations under {opts.runs_dir}/runs")
    subprocess.run([sys.executable, "-m", "cleanrl_equi.tools.plot_runs", opts.runs_dir, "--out", path,
                    "--group-by", "model", "--overwrite"], cwd=REPO, check=True)
    summary = {}
    for experiment, seeds in sorted(runs.items()):
        summary[experiment] = {
            "seeds": sorted(seeds),
            "last_success": {s: r["success"][-1] for s, r in sorted(seeds.items())},
            "best_success": {s: max(r["success"]) for s, r in sorted(seeds.items())},
            "last_discounted_return": {s: r["return"][-1] for s, r in sorted(seeds.items())},
            "best_discounted_return": {s: max(r["return"]) for s, r in sorted(seeds.items())},
            "gradient_steps": {s: r["steps"][-1] for s, r in sorted(seeds.items())},
            "mean_last_success": float(np.mean([r["success"][-1] for r in seeds.values()])),
            "mean_best_success": float(np.mean([max(r["success"]) for r in seeds.values()])),
        }
    report = {"configuration": {"script": "dqn_equi_bullet.py", **{k: v for k, v in vars(opts).items()
                                                                   if k not in ("out", "tag", "overwrite")},
                                "extra_flags": extra},
              "machine": machine_info(opts.device), "benchmark_wall_seconds": None if opts.collect_only
              else time.time() - started, "job_wall_seconds": job_seconds, "paper": PAPER, "summary": summary,
              "evaluations": runs}
    with open(os.path.join(path, "runs.json"), "w") as f:
        json.dump(report, f, indent=1)
    for experiment, s in summary.items():
        print(f"{experiment}: seeds {s['seeds']} last success {s['last_success']} best {s['best_success']} "
              f"at {s['gradient_steps']} gradient steps")
    print(f"wrote {path}/ (curves, summary.md, summary.csv, runs.json)")


if __name__ == "__main__":
    main()
