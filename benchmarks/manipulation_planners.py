"""Planner quality of the manipulation tasks: success rate and episode length of each expert over seeded episodes.

Runs `expert_action()` in every task for `--episodes` episodes (seeds 0..N-1, default settings: 0.3 m workspace,
dpos 0.05, drot pi/4, 50 steps) and writes benchmarks/results/manipulation_planners<tag>.{json,csv}. `--iclr` uses
the ICLR-2022 paper's settings instead (0.4 m workspace, drot pi/8, 100 steps) and writes
manipulation_planners_iclr<tag>.*. With --out, the .csv goes next to that .json; existing results only with
--overwrite.

    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --iclr --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 2 --tasks BlockPulling \\
        --out /tmp/manipulation_planners.json
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Output, cli, companion, cpu_model, load_average, results_path  # noqa: E402

sys.path.insert(0, REPO)
import cleanrl_equi  # noqa: E402


ICLR_SETTINGS = {"workspace_size": 0.4, "drot": math.pi / 8, "max_steps": 100}


@dataclass
class Args(Output):
    episodes: int = 100
    """episodes per task (seeds 0..episodes-1)"""
    tasks: str = ",".join(cleanrl_equi.MANIPULATION_TASKS)
    """comma-separated tasks"""
    iclr: bool = False
    """the ICLR-2022 settings instead of BulletArm's defaults (results named manipulation_planners_iclr)"""


def evaluate(task: str, episodes: int, gamma: float = 0.99, **env_kwargs) -> dict:
    env = gym.make(f"cleanrl_equi/{task}-v0", **env_kwargs)
    successes, lengths, returns, failed_seeds = [], [], [], []
    start = time.perf_counter()
    for seed in range(episodes):
        env.reset(seed=seed)
        for step in range(1, 10_000):
            _, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
            if terminated or truncated:
                break
        successes.append(bool(info["is_success"]))
        lengths.append(step)
        returns.append(gamma ** (step - 1) if info["is_success"] else 0.0)
        if not info["is_success"]:
            failed_seeds.append(seed)
    env.close()
    return {
        "task": task,
        "episodes": episodes,
        "success_rate": float(np.mean(successes)),
        "mean_length": float(np.mean(lengths)),
        "mean_length_successful": float(np.mean([n for n, s in zip(lengths, successes) if s])) if any(successes) else None,
        "max_length": int(np.max(lengths)),
        "discounted_return": float(np.mean(returns)),
        "failed_seeds": failed_seeds,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main():
    args = cli(Args, __doc__)
    path = results_path(args, "manipulation_planners_iclr.json" if args.iclr else "manipulation_planners.json",
                        (".csv",))
    env_kwargs = ICLR_SETTINGS if args.iclr else {}
    rows = []
    for task in args.tasks.split(","):
        row = evaluate(task, args.episodes, **env_kwargs)
        rows.append(row)
        print(f"{task:15s} success {row['success_rate']:.2f}  mean length {row['mean_length']:.1f}  "
              f"discounted return {row['discounted_return']:.3f}  failed seeds {row['failed_seeds']}  ({row['seconds']} s)",
              flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": platform.processor() or platform.uname().processor, "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu": cpu_model(), "load_average": load_average(),
            "settings": ("ICLR-2022 settings: workspace 0.4 m, dpos 0.05, drot pi/8, 100 steps" if args.iclr
                         else "default env kwargs (workspace 0.3 m, dpos 0.05, drot pi/4, 50 steps)"),
            "seeds": f"0..{args.episodes - 1}"}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "failed_seeds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
