"""A picture to check the manipulation tasks by eye: for each task, an expert episode's rgb render and observation.

Each task gets one row: four moments of the seed-0 expert episode (the start, two intermediate steps, the last
step), each as the rgb render (a tilted view from above the +x edge: up = -x, right = +y)
next to channel 0 of the observation (height in mm, gripper at the centre, rows = +x, columns = +y). The
title of an observation says the step, the holding flag (channel 1) and, on the last step, whether the task
succeeded. Writes benchmarks/results/manipulation_montage<tag>.png (or --out; an existing one only with --overwrite).

    uv run python benchmarks/manipulation_montage.py --overwrite
    uv run python benchmarks/manipulation_montage.py --tasks BlockPulling --out /tmp/montage.png
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import gymnasium as gym
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Output, cli, results_path  # noqa: E402

sys.path.insert(0, REPO)
import cleanrl_equi  # noqa: E402

MOMENTS = 4


@dataclass
class Args(Output):
    tasks: str = ",".join(cleanrl_equi.MANIPULATION_TASKS)
    """comma-separated tasks, one row each"""
    seed: int = 0
    """the expert episode's reset seed"""
    dpi: int = 80
    """resolution of the PNG"""


def expert_episode(task: str, seed: int = 0):
    """(rgb, observation, step, info) at every step of one expert episode, the reset included."""
    env = gym.make(f"cleanrl_equi/{task}-v0", render_mode="rgb_array")
    observation, info = env.reset(seed=seed)
    frames = [(env.render(), observation, 0, info)]
    for step in range(1, 100):
        observation, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
        frames.append((env.render(), observation, step, info))
        if terminated or truncated:
            break
    env.close()
    return frames


def main():
    args = cli(Args, __doc__)
    path = results_path(args, "manipulation_montage.png")
    tasks = args.tasks.split(",")
    fig, axes = plt.subplots(len(tasks), 2 * MOMENTS, figsize=(2.0 * 2 * MOMENTS, 2.15 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        frames = expert_episode(task, args.seed)
        picks = np.unique(np.linspace(0, len(frames) - 1, MOMENTS).round().astype(int))
        picks = list(picks) + [picks[-1]] * (MOMENTS - len(picks))
        for column, index in enumerate(picks):
            rgb, observation, step, info = frames[index]
            ax_rgb, ax_obs = axes[row, 2 * column], axes[row, 2 * column + 1]
            ax_rgb.imshow(rgb)
            ax_rgb.set_title(f"{task}" if column == 0 else f"step {step}", fontsize=8)
            image = ax_obs.imshow(observation[0], cmap="viridis", vmin=0, vmax=120, interpolation="nearest")
            title = f"obs {step}: hold {int(observation[1, 0, 0] > 0)}"
            if index == len(frames) - 1:
                title += f", success {int(info['is_success'])}"
            ax_obs.set_title(title, fontsize=7)
            for ax in (ax_rgb, ax_obs):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[row, 1].set_ylabel("rows = +x", fontsize=7)
        axes[row, 1].set_xlabel("columns = +y", fontsize=7)
    fig.colorbar(image, ax=axes, fraction=0.01, pad=0.01, label="channel 0: height above the table (mm)")
    fig.suptitle(f"cleanrl_equi manipulation tasks: seed-{args.seed} expert episodes (rgb render | observation "
                 "channel 0)", fontsize=11)
    fig.savefig(path, dpi=args.dpi, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
