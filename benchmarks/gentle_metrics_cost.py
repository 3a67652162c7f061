"""What measuring smoothness and gentleness costs: env steps/s with the physics metrics on vs off, per task.

The metrics (cleanrl_equi/envs/manipulation/metrics.py) are sampled after every physics step (about 44-62 per env
step), so their cost is paid per physics step. Each repeat runs every task with the metrics on, then off, in the
same process (random actions, the same seed), so the two sides see the same load; the ratio per repeat is reported
with the median and range. Results: benchmarks/results/gentle_metrics_cost<tag>.json.

    uv run python benchmarks/gentle_metrics_cost.py --repeats 5 --steps 300
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Output, cli, machine_info, results_path  # noqa: E402


@dataclass
class Args(Output):
    tasks: str = "BlockPulling,BlockPicking,DrawerOpening,BlockStacking"
    """comma-separated manipulation tasks"""
    steps: int = 300
    """env steps per measurement"""
    repeats: int = 5
    """measurements per task and side"""
    image_size: int = 128
    """observation size (rendering is part of every env step)"""


def steps_per_second(task: str, metrics: bool, steps: int, image_size: int, seed: int) -> float:
    import gymnasium as gym

    import cleanrl_equi  # noqa: F401

    env = gym.make(f"cleanrl_equi/{task}-v0", physics_metrics=metrics, image_size=image_size)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 5).astype(np.float32))
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def main():
    args = cli(Args, __doc__)
    path = results_path(args, "gentle_metrics_cost.json")
    results = {}
    for task in args.tasks.split(","):
        on, off = [], []
        for repeat in range(args.repeats):
            on.append(steps_per_second(task, True, args.steps, args.image_size, repeat))
            off.append(steps_per_second(task, False, args.steps, args.image_size, repeat))
        ratios = np.array(on) / np.array(off)
        results[task] = {"on_steps_per_s": on, "off_steps_per_s": off, "ratio_median": float(np.median(ratios)),
                         "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max())}
        print(f"{task}: {np.median(on):.0f} steps/s with the metrics, {np.median(off):.0f} without: "
              f"{np.median(ratios):.2f}x (range {ratios.min():.2f}-{ratios.max():.2f})", flush=True)
    info = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "steps": args.steps,
            "image_size": args.image_size, "repeats": args.repeats, "results": results}
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
