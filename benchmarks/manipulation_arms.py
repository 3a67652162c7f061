"""The manipulation tasks with robot arms: planner success, env speed and the rotation symmetry an arm breaks.

Every part runs each `--robots` robot (floating gripper, Kuka iiwa, Franka Panda; robots.py) in the scripts' default
env settings (`ManipulationEnvArgs`: the ICLR-2022 paper's 0.4 m workspace, drot pi/8, 100-step episodes, its task
sizes), with the env option `--workspace-size` to change the square. Results go to
benchmarks/results/manipulation_arms<tag>.{json,csv} (the csv holds the planner and symmetry rows).

    planners   the planner (`expert_action()`) on seeds 0..episodes-1 of every task: success rate, steps per episode.
    speed      env steps per second in one process (one core) at `--image-size` px: planner actions on Block
               Picking and Block Pulling episodes, the planner's own time excluded, resets included; the robots
               take turns over `--speed-rounds` rounds (the median is reported, and each arm's rate as a fraction
               of the floating gripper's, which a shared machine's load changes less).
    symmetry   per task: (1) images: the scene after `--symmetry-steps` planner steps is turned by 90, 180 and 270
               degrees about the gripper (`rotate_scene_state`) and rebuilt; the fraction of pixels of its image that
               differ from the turned image, then after one more step with the turned action (the arm's motion is
               not turned with the scene); (2) the planner's success and steps from the turned initial scenes of
               seeds 0..rotated_episodes-1; and, per robot, (3) the fraction of a grid over the workspace (3
               heights) where the arm reaches the gripper pose at every yaw a quarter turn of the scene gives (0,
               45, 90, 135 degrees; the gripper's yaw counts modulo 180), next to the fraction it reaches at yaw 0.

    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_arms.py --episodes 100 --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_arms.py --episodes 2 --parts planners speed \\
        --tasks BlockPicking --speed-steps 20 --out /tmp/manipulation_arms.json
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, Output, cli, companion, cpu_model, git_commit, load_average,  # noqa: E402
                    results_path)

sys.path.insert(0, REPO)
import cleanrl_equi  # noqa: E402
from cleanrl_equi.envs.manipulation.settings import ManipulationEnvArgs  # noqa: E402

Robot = Literal["floating", "kuka", "panda"]
Part = Literal["planners", "speed", "symmetry"]


@dataclass
class Args(Output):
    episodes: int = 100
    """planner episodes per task and robot (seeds 0..episodes-1)"""
    rotated_episodes: int = 20
    """initial scenes (seeds 0..n-1) per task and robot in the rotated-scene part, each turned 3 times"""
    tasks: str = ",".join(cleanrl_equi.MANIPULATION_TASKS)
    """comma-separated tasks"""
    robots: list[Robot] = field(default_factory=lambda: ["floating", "kuka", "panda"])
    """the robots to compare"""
    parts: list[Part] = field(default_factory=lambda: ["planners", "speed", "symmetry"])
    """what to measure"""
    workspace_size: float = 0.4
    """side of the workspace square in metres (the scripts' default, the ICLR-2022 paper's 0.4)"""
    image_size: int = 128
    """observation size for the speed part (the planner and symmetry parts use it too)"""
    speed_steps: int = 400
    """env steps timed per robot, task and round in the speed part"""
    speed_rounds: int = 3
    """rounds of the speed part, the robots taking turns in each"""
    symmetry_steps: int = 3
    """planner steps before the scene is turned in the image part"""
    symmetry_scenes: int = 10
    """scenes per task in the image part"""
    grid: int = 9
    """grid points per side of the workspace in the reach part"""
    note: str = "one process, OMP_NUM_THREADS=1; the machine's 2 cores were shared with other jobs"
    """how the machine was shared while this ran (recorded with the results)"""


def env_args(task: str, robot: str, args: Args) -> ManipulationEnvArgs:
    return ManipulationEnvArgs(env_id=f"cleanrl_equi/{task}-v0", robot=robot, workspace_size=args.workspace_size,
                               image_size=args.image_size)


def make(task: str, robot: str, args: Args) -> gym.Env:
    settings = env_args(task, robot, args)
    return gym.make(settings.env_id, **settings.env_kwargs())


def run_planner(env: gym.Env, **reset_kwargs) -> tuple[bool, int]:
    env.reset(**reset_kwargs)
    for step in range(1, 10_000):
        _, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
        if terminated or truncated:
            return bool(info["is_success"]), step
    raise RuntimeError("an episode did not end")


def planners(task: str, robot: str, args: Args) -> dict:
    env = make(task, robot, args)
    start = time.perf_counter()
    outcomes = [run_planner(env, seed=seed) for seed in range(args.episodes)]
    env.close()
    successes = [s for s, _ in outcomes]
    return {"part": "planners", "task": task, "robot": robot, "episodes": args.episodes,
            "success_rate": float(np.mean(successes)), "mean_steps": float(np.mean([n for _, n in outcomes])),
            "mean_steps_successful": float(np.mean([n for s, n in outcomes if s])) if any(successes) else None,
            "failed_seeds": [seed for seed, s in enumerate(successes) if not s],
            "seconds": round(time.perf_counter() - start, 1)}


def speed(robot: str, args: Args) -> dict:
    rates = {}
    for task in ("BlockPicking", "BlockPulling"):
        env = make(task, robot, args)
        stepping, steps, seed = 0.0, 0, 0
        env.reset(seed=seed)
        while steps < args.speed_steps:
            action = env.unwrapped.expert_action()
            start = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                seed += 1
                env.reset(seed=seed)
            stepping += time.perf_counter() - start
            steps += 1
        env.close()
        rates[task] = steps / stepping
    return rates


def image_symmetry(task: str, robot: str, args: Args) -> dict:
    """Fraction of pixels that differ between the turned scene's image and the turned image, at the turn and after
    one more step with the turned action; mean over scenes and the three quarter turns."""
    from cleanrl_equi.envs.manipulation.scene import rotate_scene_state

    env, turned_env = make(task, robot, args), make(task, robot, args)
    at_turn, after_step, height_error = [], [], []
    for seed in range(args.symmetry_scenes):
        env.reset(seed=seed)
        for _ in range(args.symmetry_steps):
            env.step(env.unwrapped.expert_action())
        state = env.unwrapped.get_scene_state()
        obs, _ = env.reset(options={"scene_state": state})  # at rest, like the turned copies
        action = env.unwrapped.expert_action()
        next_obs, *_ = env.step(action)
        for k in (1, 2, 3):
            turned_obs, _ = turned_env.reset(options={"scene_state": rotate_scene_state(state, k)})
            at_turn.append(float(np.mean(turned_obs[0] != np.rot90(obs[0], k))))
            turned_action = action.copy()
            for _ in range(k):  # (dx, dy) -> R (dx, dy) per quarter turn
                turned_action[1], turned_action[2] = -turned_action[2], turned_action[1]
            turned_next, *_ = turned_env.step(turned_action)
            rotated = np.rot90(next_obs[0], k)
            after_step.append(float(np.mean(turned_next[0] != rotated)))
            height_error.append(float(np.abs(turned_next[0].astype(int) - rotated.astype(int)).max()))
    env.close()
    turned_env.close()
    return {"image_pixels_differing_at_turn": float(np.mean(at_turn)),
            "image_pixels_differing_after_step": float(np.mean(after_step)),
            "image_max_height_difference_mm_after_step": float(np.max(height_error))}


def rotated_planners(task: str, robot: str, args: Args) -> dict:
    from cleanrl_equi.envs.manipulation.scene import rotate_scene_state

    env = make(task, robot, args)
    outcomes = []
    for seed in range(args.rotated_episodes):
        env.reset(seed=seed)
        state = env.unwrapped.get_scene_state()
        for k in (1, 2, 3):
            outcomes.append(run_planner(env, options={"scene_state": rotate_scene_state(state, k)}))
    env.close()
    return {"rotated_success_rate": float(np.mean([s for s, _ in outcomes])),
            "rotated_mean_steps": float(np.mean([n for _, n in outcomes])), "rotated_episodes": len(outcomes)}


def reach(robot: str, args: Args) -> dict:
    """Fractions of grid poses the arm reaches (within 2 mm and 0.02 rad, every joint inside its limits)."""
    if robot == "floating":
        return {"part": "reach", "robot": robot, "reached_yaw0": 1.0, "reached_every_rotation": 1.0}
    env = make("BlockPicking", robot, args)
    env.reset(seed=0)
    base = env.unwrapped
    arm, sim = base.arm, base.sim
    half = base.workspace_size / 2
    line = np.linspace(-half, half, args.grid)
    yaws = np.arange(4) * np.pi / 4
    reached = np.zeros((args.grid, args.grid, 3, 4), dtype=bool)
    for i, x in enumerate(line):
        for j, y in enumerate(line):
            for h, z in enumerate((0.01, 0.13, 0.25)):
                for w, yaw in enumerate(yaws):
                    reached[i, j, h, w] = reaches(arm, sim, np.array([x, y, z]), yaw)
    env.close()
    return {"part": "reach", "robot": robot, "grid": f"{args.grid} x {args.grid} x 3 heights (0.01, 0.13, 0.25 m)",
            "reached_yaw0": float(reached[..., 0].mean()), "reached_every_rotation": float(reached.all(-1).mean())}


def reaches(arm, sim, position: np.ndarray, yaw: float) -> bool:
    from cleanrl_equi.envs.manipulation.robots import ARM_JOINTS

    for joint, angle in zip(ARM_JOINTS, arm.spec.home):
        sim.resetJointState(arm.body, joint, angle, 0.0)
    joints, realised = arm.solve_reachable(position, yaw, seed=arm.spec.home, posture=True)
    joints = arm.solve(position, realised, seed=joints, rounds=8, posture=True)
    if not arm.within_limits(joints):
        return False
    for joint, angle in zip(ARM_JOINTS, joints):
        sim.resetJointState(arm.body, joint, float(angle), 0.0)
    flange_position, flange_orientation = arm.flange_target(position, realised)
    link = sim.getLinkState(arm.body, arm.spec.flange, computeForwardKinematics=1)
    turn = sim.getDifferenceQuaternion(link[5], flange_orientation)
    angle = 2 * np.arccos(min(1.0, abs(turn[3])))
    return bool(np.abs(np.array(link[4]) - flange_position).max() < 0.002 and angle < 0.02)


def main():
    args = cli(Args, __doc__)
    path = results_path(args, "manipulation_arms.json", (".csv",))
    tasks = args.tasks.split(",")
    rows = []
    load_before = load_average()
    if "planners" in args.parts:
        for task in tasks:
            for robot in args.robots:
                row = planners(task, robot, args)
                rows.append(row)
                print(f"planners {task:14s} {robot:8s} success {row['success_rate']:.2f}  steps "
                      f"{row['mean_steps']:.1f}  failed seeds {row['failed_seeds'][:10]}  ({row['seconds']} s)",
                      flush=True)
    if "speed" in args.parts:
        rounds = {robot: [] for robot in args.robots}
        for _ in range(args.speed_rounds):
            for robot in args.robots:
                rounds[robot].append(speed(robot, args))
        for robot in args.robots:
            row = {"part": "speed", "robot": robot, "image_size": args.image_size, "steps": args.speed_steps,
                   "rounds": args.speed_rounds}
            for task in rounds[robot][0]:
                rates = [rates[task] for rates in rounds[robot]]
                row[f"steps_per_second_{task}"] = round(float(np.median(rates)), 1)
                if "floating" in rounds:
                    ratios = [rate / floating[task] for rate, floating in zip(rates, rounds["floating"])]
                    row[f"relative_to_floating_{task}"] = round(float(np.median(ratios)), 3)
            rows.append(row)
            print(f"speed {robot:8s} {row}", flush=True)
    if "symmetry" in args.parts:
        for robot in args.robots:
            row = reach(robot, args)
            rows.append(row)
            print(f"reach {robot:8s} {row}", flush=True)
        for task in tasks:
            for robot in args.robots:
                row = {"part": "symmetry", "task": task, "robot": robot, **image_symmetry(task, robot, args),
                       **rotated_planners(task, robot, args)}
                rows.append(row)
                print(f"symmetry {task:14s} {robot:8s} {row}", flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
            "note": args.note, "commit": git_commit(),
            "settings": f"ManipulationEnvArgs defaults (paper settings) with workspace {args.workspace_size} m, "
                        f"{args.image_size} px", "args": {k: v for k, v in vars(args).items()}}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "failed_seeds"]
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
