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
    uv run python benchmarks/offline_learning.py --preset cpu --tag _cpu
Extra flags after `--` go to every training run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CPU_PRESET = ["--group-order", "4", "--n-hidden", "16", "--image-size", "64", "--batch-size", "32",
              "--policy-lr", "3e-4", "--q-lr", "3e-4"]


def build_datasets(opts, image_size: int) -> dict[tuple[str, str], str]:
    """{(task, data kind): dataset path}, collected once into --runs-dir/datasets."""
    checkpoints = dict(item.split("=", 1) for item in opts.medium_checkpoint)
    paths = {}
    for task in opts.tasks.split(","):
        for kind in opts.data.split(","):
            path = os.path.join(opts.runs_dir, "datasets", f"{task}_{kind}_{opts.num_episodes}ep_{image_size}px.npz")
            paths[(task, kind)] = path
            if os.path.exists(path):
                continue
            cmd = [sys.executable, "-m", "cleanrl_equi.datasets", "--env-id", f"cleanrl_equi/{task}-v0",
                   "--quality", kind, "--num-episodes", str(opts.num_episodes), "--image-size", str(image_size),
                   "--out", path]
            if kind != "expert":
                if task not in checkpoints:
                    raise SystemExit(f"--data {kind} needs --medium-checkpoint {task}=<sac_equi_bullet checkpoint>")
                cmd += ["--checkpoint", checkpoints[task]]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
    return paths


def run_all(opts, datasets, extra):
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    os.makedirs(os.path.join(opts.runs_dir, "logs"), exist_ok=True)
    running = []
    for (task, kind), path in datasets.items():
        for algo in opts.algos.split(","):
            for model in opts.models.split(","):
                for seed in opts.seeds.split(","):
                    while len(running) >= opts.parallel:
                        running = [p for p in running if p.poll() is None]
                        time.sleep(2)
                    name = f"{algo}_{kind}_{model}"
                    cmd = [sys.executable, os.path.join(REPO, f"{algo}_equi_offline.py"),
                           "--env-id", f"cleanrl_equi/{task}-v0", "--dataset", path, "--model", model,
                           "--seed", seed, "--exp-name", name, "--run-name", f"cleanrl_equi_{task}-v0__{name}__{seed}",
                           "--total-timesteps", str(opts.total_timesteps), "--eval-frequency",
                           str(opts.eval_frequency), "--eval-episodes", str(opts.eval_episodes),
                           *(["--no-cuda"] if opts.device == "cpu" else []), *extra]
                    log = open(os.path.join(opts.runs_dir, "logs", f"{task}_{name}_{seed}.log"), "w")
                    print(" ".join(cmd), flush=True)
                    running.append(subprocess.Popen(cmd, cwd=opts.runs_dir, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT))
    for p in running:
        p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                        help="cpu: C4, n_hidden 16, 64 px, batch 32, lr 3e-4, 600 steps (paper: the scripts' defaults)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tasks", default="BlockPulling,BlockInBowl")
    parser.add_argument("--data", default="expert", help="comma list of expert, medium, mixed")
    parser.add_argument("--medium-checkpoint", action="append", default=[], help="TASK=PATH, per task")
    parser.add_argument("--num-episodes", type=int, default=10, help="episodes per dataset (the paper's 10 demos)")
    parser.add_argument("--algos", default="cql,iql")
    parser.add_argument("--models", default="equi,cnn")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--total-timesteps", type=int, default=None, help="gradient steps per run")
    parser.add_argument("--eval-frequency", type=int, default=None)
    parser.add_argument("--eval-episodes", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per run")
    parser.add_argument("--runs-dir", default=os.path.join(REPO, "benchmarks", "offline_runs"))
    parser.add_argument("--collect-only", action="store_true", help="skip training; summarise --runs-dir")
    parser.add_argument("--hardware", default="", help="hardware description for the results")
    parser.add_argument("--tag", default="")
    opts, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    cpu = opts.preset == "cpu"
    if cpu:
        opts.device, extra = "cpu", CPU_PRESET + extra
    opts.total_timesteps = opts.total_timesteps or (600 if cpu else 20000)
    opts.eval_frequency = opts.eval_frequency or (150 if cpu else 1000)
    opts.eval_episodes = opts.eval_episodes or (20 if cpu else 100)
    image_size = int(extra[extra.index("--image-size") + 1]) if "--image-size" in extra else 128
    started = time.time()
    if not opts.collect_only:
        run_all(opts, build_datasets(opts, image_size), extra)
    out = os.path.join(HERE, "results", f"offline_learning{opts.tag}")
    subprocess.run([sys.executable, "-m", "cleanrl_equi.tools.plot_runs", os.path.join(opts.runs_dir, "runs"), "--out", out,
                    "--tags", "eval/success_rate", "eval/discounted_return", "--points", "50"], check=True, cwd=REPO)
    hardware = opts.hardware or f"{platform.machine()} {opts.device}, {os.cpu_count()} cores"
    info = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware, "wall_seconds": round(time.time() - started),
            "settings": {k: v for k, v in vars(opts).items() if k not in ("hardware", "tag")}, "extra_flags": extra}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {out}/ (summary.md, summary.csv, plots, info.json)")


if __name__ == "__main__":
    main()
