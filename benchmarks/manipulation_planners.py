"""Planner quality of the manipulation tasks: success rate and episode length of each expert over seeded episodes.

Runs `expert_action()` in every task for `--episodes` episodes (seeds 0..N-1, default settings: 0.3 m workspace,
dpos 0.05, drot pi/4, 50 steps) and writes benchmarks/results/manipulation_planners<tag>.{json,csv}. `--iclr` uses
the ICLR-2022 paper's settings instead (0.4 m workspace, drot pi/8, 100 steps) and writes
manipulation_planners_iclr<tag>.*. `--discrete` runs the planners as dqn_equi_bullet.py collects its
demonstrations: on its step grid (dpos 0.02, drot pi/16), planning for whole steps (`expert_action(discrete=True)`)
and rounded to its 162 actions as the DQN rounds them; without --iclr that is its CPU preset's scene (BulletArm's:
0.3 m, 50 steps, BulletArm's task sizes), with --iclr its default scene (0.4 m, 100 steps, the paper's task sizes);
it writes manipulation_planners[_iclr]_discrete<tag>.*. `--action-filter-tau` turns the env's action filter on
(manipulation_planners[...]_filter<tau><tag>.*). With --out, the .csv goes next to that .json; existing
results only with --overwrite.

    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --iclr --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --discrete --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --discrete --iclr --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --discrete --no-whole-steps \\
        --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_planners.py --episodes 100 --action-filter-tau 0.1 \\
        --overwrite
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
from cleanrl_equi.envs.manipulation.tasks import PAPER_TASK_KWARGS  # noqa: E402


ICLR_SETTINGS = {"workspace_size": 0.4, "drot": math.pi / 8, "max_steps": 100}
DQN_GRID = {"dpos": 0.02, "drot": math.pi / 16}  # dqn_equi_bullet.py's defaults (--dpos, --drot-n 16)


@dataclass
class Args(Output):
    episodes: int = 100
    """episodes per task (seeds 0..episodes-1)"""
    tasks: str = ",".join(cleanrl_equi.MANIPULATION_TASKS)
    """comma-separated tasks"""
    iclr: bool = False
    """the ICLR-2022 settings instead of BulletArm's defaults (results named manipulation_planners_iclr)"""
    discrete: bool = False
    """the planners as the DQN's demonstrations: its step grid, whole-step planning, its rounding to 162 actions"""
    whole_steps: bool = True
    """with --discrete: plan for whole steps; --no-whole-steps rounds the continuous planner's actions instead (the
    DQN's demonstrations before the planners knew its grid; results named ..._discrete_rounded)"""
    action_filter_tau: float = 0.0
    """the env's action filter (its time constant in s; 0 = off): the executed move follows the commanded one as a
    first-order low-pass, the physics prior of sac_equi_bullet.py's --action-filter-tau (results named
    ..._filter<tau>)"""


def to_discrete(action: np.ndarray) -> np.ndarray:
    """The DQN's rounding of a planner action (dqn_equi_bullet.py's encode_actions, then decode_actions): each
    step component to the nearest of -1, 0, +1 (half to even), the fingers open only where p > 0."""
    steps = np.clip(np.rint(np.asarray(action, dtype=np.float64)), -1, 1)
    steps[0] = 1.0 if action[0] > 0 else -1.0
    return steps.astype(np.float32)


def evaluate(task: str, episodes: int, gamma: float = 0.99, discrete: bool = False, whole_steps: bool = True,
             **env_kwargs) -> dict:
    env = gym.make(f"cleanrl_equi/{task}-v0", **env_kwargs)
    successes, lengths, returns, failed_seeds = [], [], [], []
    start = time.perf_counter()
    for seed in range(episodes):
        env.reset(seed=seed)
        for step in range(1, 10_000):
            action = env.unwrapped.expert_action(discrete=discrete and whole_steps)
            _, _, terminated, truncated, info = env.step(to_discrete(action) if discrete else action)
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


def settings(args: Args) -> str:
    if args.discrete:
        scene = ("dqn_equi_bullet.py's default scene: workspace 0.4 m, 100 steps, the paper's task sizes" if args.iclr
                 else "dqn_equi_bullet.py's CPU-preset scene: workspace 0.3 m, 50 steps, BulletArm's task sizes")
        planner = ("planning for whole steps (expert_action(discrete=True))" if args.whole_steps
                   else "the continuous planner (expert_action())")
        return f"{scene}; dpos 0.02, drot pi/16; {planner}, actions rounded to the DQN's 162 as its demonstrations are"
    return ("ICLR-2022 settings: workspace 0.4 m, dpos 0.05, drot pi/8, 100 steps" if args.iclr
            else "default env kwargs (workspace 0.3 m, dpos 0.05, drot pi/4, 50 steps)")


def main():
    args = cli(Args, __doc__)
    name = "manipulation_planners" + ("_iclr" if args.iclr else "") + ("_discrete" if args.discrete else "")
    name += "_rounded" if args.discrete and not args.whole_steps else ""
    name += f"_filter{args.action_filter_tau:g}" if args.action_filter_tau else ""
    path = results_path(args, name + ".json", (".csv",))
    env_kwargs = dict(ICLR_SETTINGS) if args.iclr else {}
    if args.discrete:
        env_kwargs.update(DQN_GRID, physics_metrics=False)
    if args.action_filter_tau:
        env_kwargs["action_filter_tau"] = args.action_filter_tau
    rows = []
    for task in args.tasks.split(","):
        task_kwargs = PAPER_TASK_KWARGS.get(task, {}) if args.discrete and args.iclr else {}
        row = evaluate(task, args.episodes, discrete=args.discrete, whole_steps=args.whole_steps, **env_kwargs,
                       **task_kwargs)
        rows.append(row)
        print(f"{task:15s} success {row['success_rate']:.2f}  mean length {row['mean_length']:.1f}  "
              f"discounted return {row['discounted_return']:.3f}  failed seeds {row['failed_seeds']}  ({row['seconds']} s)",
              flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": platform.processor() or platform.uname().processor, "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu": cpu_model(), "load_average": load_average(),
            "settings": settings(args) + (f"; action filter tau {args.action_filter_tau:g} s" if args.action_filter_tau
                                          else ""),
            "seeds": f"0..{args.episodes - 1}"}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "failed_seeds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
