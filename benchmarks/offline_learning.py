"""Equivariant vs plain offline RL in the low-data regime: Equi-CQL vs CQL and Equi-IQL vs IQL.

The paper's claim under test (Tangri et al. 2024): with few demonstrations, the equivariant networks learn a
working policy where the plain CNNs do not. For each task and data kind the datasets are built once
(`cleanrl_equi.datasets`: `expert` = planner episodes; `medium` = greedy roll-outs of a saved
sac_equi_bullet.py policy whose discounted return passes 0.4, given with --medium-checkpoint TASK=PATH), then every
(task, data, algorithm, model, seed) trains in its own process as a user would run it, and the runs are summarised
by `python -m cleanrl_equi.tools.plot_runs` (curves of mean and 95% interval over seeds, a table of last and best
success) into benchmarks/results/offline_learning<tag>/, with the settings and hardware in info.json.

    # the paper's setting on a GPU node (C8, n_hidden 64, 128 px, batch 8, 100k steps is the paper; 20k here)
    uv run python benchmarks/offline_learning.py --tasks BlockPulling,BlockInBowl --data expert \\
        --total-timesteps 20000 --parallel 4 --tag _gpu
    # with medium data too (a SACfD checkpoint per task, e.g. from benchmarks/sac_learning.py runs with --save-model)
    uv run python benchmarks/offline_learning.py --data expert,medium \\
        --medium-checkpoint BlockPulling=runs/<run>/sac_equi_bullet.cleanrl_model --tag _gpu
    # the CPU preset committed in benchmarks/results (small networks and images)
    uv run python benchmarks/offline_learning.py --preset cpu --tag _cpu --overwrite
    # a tiny check that writes nowhere near the committed results
    uv run python benchmarks/offline_learning.py --preset cpu --tasks BlockPulling --algos iql --models cnn --seeds 1 \\
        --num-episodes 1 --total-timesteps 20 --eval-frequency 10 --eval-episodes 1 --runs-dir /tmp/offline_runs \\
        --out /tmp/offline_learning_check

The datasets are made by `python -m cleanrl_equi.tools.make_dataset` and, like the training runs, run --parallel at a
time with their output in <runs-dir>/logs/. An existing results folder is replaced only when --out names it or with
--overwrite.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (REPO, Job, Launch, Output, cli, device_flags, fail, machine_info, results_path,  # noqa: E402
                    run_jobs, thread_env)

CPU_PRESET = ["--group-order", "4", "--n-hidden", "16", "--image-size", "64", "--batch-size", "32",
              "--policy-lr", "3e-4", "--q-lr", "3e-4"]


@dataclass
class Args(Output, Launch):
    preset: Literal["paper", "cpu"] = "paper"
    """cpu: --device cpu, C4, n_hidden 16, 64 px, batch 32, lr 3e-4, 600 steps (paper: the scripts' defaults)"""
    tasks: str = "BlockPulling,BlockInBowl"
    """comma-separated manipulation tasks"""
    data: str = "expert"
    """comma-separated data kinds: expert, medium, mixed"""
    medium_checkpoint: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """TASK=PATH of a sac_equi_bullet.py model saved with --save-model, for medium/mixed data (repeat per task)"""
    num_episodes: int = 10
    """episodes per dataset (the paper's 10 demos)"""
    algos: str = "cql,iql"
    """comma-separated algorithms: cql, iql"""
    models: str = "equi,cnn"
    """comma-separated models: equi, cnn"""
    seeds: str = "1,2,3"
    """comma-separated seeds"""
    total_timesteps: Optional[int] = None
    """gradient steps per run (default: 20000, or 600 with --preset cpu)"""
    eval_frequency: Optional[int] = None
    """gradient steps between evaluations (default: 1000, or 150 with --preset cpu)"""
    eval_episodes: Optional[int] = None
    """episodes per evaluation (default: 100, or 20 with --preset cpu)"""
    runs_dir: str = os.path.join(REPO, "benchmarks", "offline_runs")
    """folder of the datasets, the runs' TensorBoard logs (runs/) and their output (logs/)"""
    collect_only: bool = False
    """skip training; summarise the runs already in --runs-dir"""
    hardware: str = ""
    """hardware description for the results (default: detected)"""


def build_datasets(opts, image_size: int) -> dict[tuple[str, str], str]:
    """{(task, data kind): dataset path}, collected once into --runs-dir/datasets (--parallel at a time)."""
    checkpoints = dict(item.split("=", 1) for item in opts.medium_checkpoint)
    paths, jobs = {}, []
    for task in opts.tasks.split(","):
        for kind in opts.data.split(","):
            path = os.path.join(opts.runs_dir, "datasets", f"{task}_{kind}_{opts.num_episodes}ep_{image_size}px.npz")
            paths[(task, kind)] = path
            if os.path.exists(path):
                continue
            cmd = [sys.executable, "-m", "cleanrl_equi.tools.make_dataset", "--env-id", f"cleanrl_equi/{task}-v0",
                   "--quality", kind, "--num-episodes", str(opts.num_episodes), "--image-size", str(image_size),
                   "--out", path]
            if kind != "expert":
                cmd += ["--checkpoint", checkpoints[task]]
            log = os.path.join(opts.runs_dir, "logs", f"dataset_{task}_{kind}.log")
            jobs.append(Job(f"dataset {task} {kind}", cmd, log, REPO, thread_env(opts.threads)))
    run_jobs(jobs, opts.parallel)
    return paths


def run_all(opts, datasets, extra):
    jobs = []
    for (task, kind), path in datasets.items():
        for algo in opts.algos.split(","):
            for model in opts.models.split(","):
                for seed in opts.seeds.split(","):
                    name = f"{algo}_{kind}_{model}"
                    cmd = [sys.executable, os.path.join(REPO, f"{algo}_equi_offline.py"),
                           "--env-id", f"cleanrl_equi/{task}-v0", "--dataset", path, "--model", model,
                           "--seed", seed, "--exp-name", name, "--run-name", f"cleanrl_equi_{task}-v0__{name}__{seed}",
                           "--total-timesteps", str(opts.total_timesteps), "--eval-frequency",
                           str(opts.eval_frequency), "--eval-episodes", str(opts.eval_episodes),
                           *device_flags(opts.device), *extra]
                    log = os.path.join(opts.runs_dir, "logs", f"{task}_{name}_{seed}.log")
                    jobs.append(Job(f"{task} {name} seed {seed}", cmd, log, opts.runs_dir, thread_env(opts.threads)))
    run_jobs(jobs, opts.parallel)


def main():
    opts, extra = cli(Args, __doc__, passthrough=True)
    opts.runs_dir = os.path.abspath(opts.runs_dir)
    cpu = opts.preset == "cpu"
    if cpu:
        opts.device, extra = "cpu", CPU_PRESET + extra
    opts.total_timesteps = opts.total_timesteps or (600 if cpu else 20000)
    opts.eval_frequency = opts.eval_frequency or (150 if cpu else 1000)
    opts.eval_episodes = opts.eval_episodes or (20 if cpu else 100)
    for item in opts.medium_checkpoint:
        if "=" not in item:
            fail(f"--medium-checkpoint {item!r} is not TASK=PATH, e.g. "
                 "BlockPulling=runs/<run>/sac_equi_bullet.cleanrl_model.")
    checkpoints = dict(item.split("=", 1) for item in opts.medium_checkpoint)
    missing = [t for t in opts.tasks.split(",") if t not in checkpoints]
    if not opts.collect_only and set(opts.data.split(",")) - {"expert"} and missing:
        fail(f"--data {opts.data} needs --medium-checkpoint {missing[0]}=<sac_equi_bullet checkpoint> for each task.")
    image_size = int(extra[extra.index("--image-size") + 1]) if "--image-size" in extra else 128
    out = results_path(opts, "offline_learning", folder=True)
    started = time.time()
    if not opts.collect_only:
        run_all(opts, build_datasets(opts, image_size), extra)
    subprocess.run([sys.executable, "-m", "cleanrl_equi.tools.plot_runs", os.path.join(opts.runs_dir, "runs"),
                    "--out", out, "--tags", "eval/success_rate", "eval/discounted_return", "--points", "50",
                    "--overwrite"],
                   check=True, cwd=REPO)
    machine = machine_info(opts.device)
    hardware = opts.hardware or f"{machine['cpu']} {opts.device}, {os.cpu_count()} cores" + (
        f", {machine['gpu']}" if "gpu" in machine else "")
    info = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware, "wall_seconds": round(time.time() - started),
            "settings": {k: v for k, v in vars(opts).items() if k not in ("hardware", "tag", "out", "overwrite")},
            "extra_flags": extra, "machine": machine}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {out}/ (summary.md, summary.csv, plots, info.json)")


if __name__ == "__main__":
    main()
