"""Speed of the manipulation tasks: env steps per second, renderers, and scaling over processes.

Measures, on this machine:
  1. steps/s of every task in one process (default settings, 128 x 128 analytic observations), with uniform random
     actions and with expert actions; resets are inside the timed loop (they are part of a run);
  2. the observation renderers on the same scenes: frames/s of the analytic numpy ray caster, pybullet's
     TinyRenderer and rayTestBatch (128 x 128 each), and Block Pulling steps/s with each of them;
  3. scaling: total steps/s of Block Pulling with random actions in N independent processes and in a gymnasium
     AsyncVectorEnv with N workers, for N = 1 .. --max-processes.
Writes benchmarks/results/manipulation_speed.{json,csv}. Run it with one BLAS thread per process:

    OMP_NUM_THREADS=1 uv run python benchmarks/manipulation_speed.py

BulletArm's close-loop envs take 0.03-0.08 s per step in one process on this kind of machine (SPEC §6:
12-33 steps/s); the ratio column compares against its fastest end, 33 steps/s.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import multiprocessing
import os
import platform
import time

import gymnasium as gym
import numpy as np

import cleanrl_equi

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BULLETARM_STEPS_PER_SECOND = 33.0  # the fast end of 0.03-0.08 s per step (SPEC §6, measured on this machine type)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per single-process measurement")
    parser.add_argument("--frames", type=int, default=300, help="renders per renderer measurement")
    parser.add_argument("--max-processes", type=int, default=os.cpu_count())
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.time()

    per_task = []
    for task in cleanrl_equi.MANIPULATION_TASKS:
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

    cpu_model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model, "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - started, 1),
        "settings": "default kwargs: 128x128 analytic observations, workspace 0.3 m, dpos 0.05, drot pi/4",
        "note": ("The machine is shared with other jobs: absolute numbers move with its load; compare the numbers "
                 "taken side by side in one run. BulletArm reference: 12-33 steps/s per core (SPEC §6)."),
    }
    if max(load_before[0], meta["load_average_after"][0]) > 0.75 * (os.cpu_count() or 1):
        meta["scaling_note"] = (f"load average {load_before[0]:.1f} -> {meta['load_average_after'][0]:.1f} on "
                                f"{os.cpu_count()} cores during this run: other jobs held the cores, so the scaling "
                                "rows measure contention, not how the env scales; rerun on idle cores.")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "manipulation_speed.json"), "w") as f:
        json.dump({"meta": meta, "per_task": per_task, "renderers": renderers, "scaling": scaling}, f, indent=2)
    with open(os.path.join(RESULTS, "manipulation_speed.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        for name, rows in (("per_task", per_task), ("renderers", renderers), ("scaling", scaling)):
            writer.writerow([f"# {name}"])
            writer.writerow(list(rows[0]))
            writer.writerows([list(row.values()) for row in rows])
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
