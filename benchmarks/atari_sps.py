"""Training speed of ppo_atari.py vs ppo_atari_equi.py, side by side on one machine, and env throughput of the two
Atari back-ends.

Each script runs a few full PPO iterations at its default settings (8 envs x 128 steps, 4 epochs x 4 minibatches);
runs alternate plain / equi / plain / ... so both see the same machine load, and the ratio of their SPS (steps
per second, the script's own `charts/SPS` at the end of the run) is what counts. Env throughput steps the vector
envs with random actions (no network).

    uv run python benchmarks/atari_sps.py --repeats 3 --iterations 3
"""

import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cleanrl_equi.atari import make_atari_envs  # noqa: E402


@dataclass
class Args:
    repeats: int = 3
    """alternating runs of each script"""
    iterations: int = 3
    """PPO iterations per run (1024 steps each at the default settings)"""
    env_id: str = "BreakoutNoFrameskip-v4"
    """the game"""
    env_steps: int = 2000
    """vector steps per env-throughput measurement"""
    num_envs: str = "8,32"
    """comma-separated numbers of envs for the env-throughput measurement"""
    extra: str = ""
    """extra flags for both scripts, e.g. '--no-cuda'"""
    output: str = os.path.join(REPO, "benchmarks", "results", "atari_sps.json")
    """where to write the results"""


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def last_sps(run_dir: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))[0])
    accumulator.Reload()
    return accumulator.Scalars("charts/SPS")[-1].value


def training_sps(script: str, args: Args, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, os.path.join(REPO, script), "--env-id", args.env_id]
        command += ["--total-timesteps", str(1024 * args.iterations), *extra, *args.extra.split()]
        subprocess.run(command, cwd=workdir, check=True, capture_output=True)
        return last_sps(glob.glob(os.path.join(workdir, "runs", "*"))[0])


def env_throughput(env_id: str, num_envs: int, steps: int, backend: str, async_envs: bool = False) -> float:
    envs = make_atari_envs(env_id, num_envs, backend, async_envs=async_envs)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, envs.single_action_space.n, size=(steps, num_envs))
    start = time.perf_counter()
    for t in range(steps):
        envs.step(actions[t])
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed


if __name__ == "__main__":
    args = tyro.cli(Args)
    variants = {
        "ppo_atari.py": [],
        "ppo_atari_equi.py (channel-matched)": ["--trunk", "channels"],
        "ppo_atari_equi.py (parameter-matched)": ["--trunk", "params"],
    }
    sps: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, extra in variants.items():
            sps[name].append(training_sps(name.split()[0], args, extra))
            print(f"repeat {repeat}: {name}: {sps[name][-1]:.0f} SPS", flush=True)
    plain = np.array(sps["ppo_atari.py"])
    training = {
        name: {"sps": values, "median_sps": float(np.median(values)), "ratio_to_plain": float(np.median(np.array(values) / plain))}
        for name, values in sps.items()
    }

    throughput = []
    for num_envs in [int(n) for n in args.num_envs.split(",")]:
        for backend, async_envs in (("ale", False), ("gym", False), ("gym", True)):
            label = "ale native" if backend == "ale" else ("gym async" if async_envs else "gym sync")
            value = env_throughput(args.env_id, num_envs, args.env_steps, backend, async_envs)
            throughput.append({"num_envs": num_envs, "backend": label, "steps_per_s": value})
            print(f"{num_envs} envs, {label}: {value:.0f} env steps/s", flush=True)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "hardware": f"{cpu_model()}, {os.cpu_count()} cores, "
        + ("GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "load_average_at_end": os.getloadavg(),
        "env_id": args.env_id,
        "settings": "script defaults (8 envs x 128 steps, 4 epochs x 4 minibatches), " + f"{args.iterations} iterations/run",
        "training": training,
        "env_throughput": throughput,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
