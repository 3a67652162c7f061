"""Speed of the manipulation tasks: env steps per second, renderers, and scaling over processes.

Measures, on this machine:
  1. steps/s of every task in one process (default settings, 128 x 128 analytic observations), with uniform random
     actions and with expert actions; resets are inside the timed loop (they are part of a run);
  2. the observation renderers on the same scenes: frames/s of the analytic numpy ray caster, pybullet's
     TinyRenderer and rayTestBatch (128 x 128 each), and Block Pulling steps/s with each of them;
  3. scaling: total steps/s of Block Pulling with random actions in N independent processes and in a gymnasium
     AsyncVectorEnv with N workers, for N = 1 .. --max-processes.
Writes benchmarks/results/manipulation_speed<tag>.{json,csv} (or --out and its .csv; existing results only with
--overwrite). Run it with one BLAS thread per process:

    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_speed.py --overwrite
    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_speed.py --steps 50 --frames 10 --max-processes 1 \
        --tasks BlockPulling --out /tmp/manipulation_speed.json

BulletArm's close-loop envs take 0.03-0.08 s per step in one process on this kind of machine
(12-33 steps/s); the ratio column compares against its fastest end, 33 steps/s.
"""

from __future__ import annotations

import csv
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Output, cli, companion, cpu_model, results_path  # noqa: E402

sys.path.insert(0, REPO)
import cleanrl_equi  # noqa: E402

BULLETARM_STEPS_PER_SECOND = 33.0  # the fast end of 0.03-0.08 s per step (measured on this machine type)


@dataclass
class Args(Output):
    steps: int = 1000
    """steps per single-process measurement"""
    frames: int = 300
    """renders per renderer measurement"""
    max_processes: int = os.cpu_count() or 1
    """the scaling measurement uses 1 .. this many processes (default: the logical cores)"""
    tasks: str = ",".join(cleanrl_equi.MANIPULATION_TASKS)
    """comma-separated tasks of the per-task measurement"""


def steps_per_second(task: str, policy: str, steps: int, seed: int = 0, **kwargs) -> float:
    env = gym.make(f"cleanrl_equi/{task}-v0", **kwargs)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        action = env.unwrapped.expert_action() if policy == "expert" else rng.uniform(-1, 1, 5).astype(np.float32)
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def render_frames_per_second(task: str, renderer: str, frames: int) -> float:
    """Observation renders per second on mid-episode scenes (the same scenes for every renderer)."""
    env = gym.make(f"cleanrl_equi/{task}-v0", renderer=renderer).unwrapped
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.expert_action())
    start = time.perf_counter()
    for _ in range(frames):
        env._observation()
    elapsed = time.perf_counter() - start
    env.close()
    return frames / elapsed


def _worker(task: str, steps: int, seed: int, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    queue.put(steps_per_second(task, "random", steps, seed=seed))


def independent_processes(task: str, processes: int, steps: int) -> float:
    """Total steps/s of `processes` envs, each stepping on its own in a separate process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(task, steps, seed, queue)) for seed in range(processes)]
    for worker in workers:
        worker.start()
    rates = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


def async_vector_env(task: str, processes: int, steps: int) -> float:
    """Total env steps/s of an AsyncVectorEnv with `processes` workers (autoreset, random actions)."""
    envs = gym.vector.AsyncVectorEnv([lambda: gym.make(f"cleanrl_equi/{task}-v0") for _ in range(processes)])
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    batches = max(1, steps // processes)
    start = time.perf_counter()
    for _ in range(batches):
        envs.step(rng.uniform(-1, 1, (processes, 5)).astype(np.float32))
    elapsed = time.perf_counter() - start
    envs.close()
    return batches * processes / elapsed


def main():
    args = cli(Args, __doc__)
    path = results_path(args, "manipulation_speed.json", (".csv",))
    load_before = os.getloadavg()
    started = time.time()

    per_task = []
    for task in args.tasks.split(","):
        row = {"task": task,
               "random_steps_per_s": round(steps_per_second(task, "random", args.steps), 1),
               "expert_steps_per_s": round(steps_per_second(task, "expert", args.steps), 1)}
        row["random_vs_bulletarm"] = round(row["random_steps_per_s"] / BULLETARM_STEPS_PER_SECOND, 1)
        row["expert_vs_bulletarm"] = round(row["expert_steps_per_s"] / BULLETARM_STEPS_PER_SECOND, 1)
        per_task.append(row)
        print(row, flush=True)

    renderers = []
    for renderer in ("analytic", "tiny", "raycast"):
        row = {"renderer": renderer}
        for task in ("BlockPulling", "DrawerOpening", "BlockInBowl"):
            row[f"{task}_frames_per_s"] = round(render_frames_per_second(task, renderer, args.frames), 1)
        row["BlockPulling_random_steps_per_s"] = round(
            steps_per_second("BlockPulling", "random", max(200, args.steps // 3), renderer=renderer), 1)
        renderers.append(row)
        print(row, flush=True)

    scaling = []
    for processes in range(1, args.max_processes + 1):
        row = {"processes": processes,
               "independent_total_steps_per_s": round(independent_processes("BlockPulling", processes, args.steps), 1),
               "async_vector_env_total_steps_per_s": round(async_vector_env("BlockPulling", processes, args.steps), 1)}
        scaling.append(row)
        print(row, flush=True)
    for row in scaling:
        for key in ("independent_total_steps_per_s", "async_vector_env_total_steps_per_s"):
            row[key.replace("total_steps_per_s", "speedup")] = round(row[key] / scaling[0][key], 2)

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - started, 1),
        "settings": "default kwargs: 128x128 analytic observations, workspace 0.3 m, dpos 0.05, drot pi/4",
        "note": ("The machine is shared with other jobs: absolute numbers move with its load; compare the numbers "
                 "taken side by side in one run. BulletArm reference: 12-33 steps/s per core (measured on this machine type)."),
    }
    if max(load_before[0], meta["load_average_after"][0]) > 0.75 * (os.cpu_count() or 1):
        meta["scaling_note"] = (f"load average {load_before[0]:.1f} -> {meta['load_average_after'][0]:.1f} on "
                                f"{os.cpu_count()} cores during this run: other jobs held the cores, so the scaling "
                                "rows measure contention, not how the env scales; rerun on idle cores.")
    with open(path, "w") as f:
        json.dump({"meta": meta, "per_task": per_task, "renderers": renderers, "scaling": scaling}, f, indent=2)
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        for name, rows in (("per_task", per_task), ("renderers", renderers), ("scaling", scaling)):
            writer.writerow([f"# {name}"])
            writer.writerow(list(rows[0]))
            writer.writerows([list(row.values()) for row in rows])
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
