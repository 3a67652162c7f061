"""Training speed of ppo_atari.py vs ppo_atari_equi.py, side by side on one machine, and env throughput of the two
Atari back-ends.

Each script runs a few full PPO iterations at its default settings (8 envs x 128 steps, 4 epochs x 4 minibatches);
runs alternate plain / equi / plain / ... so both see the same machine load, and the ratio of their SPS (steps
per second, the script's own `charts/SPS` at the end of the run) is what counts. Env throughput steps the vector
envs with random actions (no network).

    uv run python benchmarks/atari_sps.py --repeats 3 --iterations 3 --overwrite
    uv run python benchmarks/atari_sps.py --repeats 1 --iterations 1 --num-envs 8 --out /tmp/atari_sps.json -- --no-cuda

Writes benchmarks/results/atari_sps<tag>.json (or --out; existing results only with --overwrite). Each run's output
goes to a log file in a temporary folder; a failed run is reported with the tail of its log.
"""

import glob
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import REPO, Job, Output, cli, cpu_model, machine_info, results_path, run_jobs  # noqa: E402

sys.path.insert(0, REPO)
from cleanrl_equi.envs.atari import make_atari_envs  # noqa: E402


@dataclass
class Args(Output):
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


def last_sps(run_dir: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))[0])
    accumulator.Reload()
    return accumulator.Scalars("charts/SPS")[-1].value


def training_sps(script: str, args: Args, flags: list[str], extra: list[str]) -> float:
    """The script's own final charts/SPS of one run in a fresh folder (the run is alone on the machine)."""
    log = os.path.join(tempfile.gettempdir(), f"atari_sps_{os.getpid()}_{script}.log")  # kept when the run fails
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, os.path.join(REPO, script), "--env-id", args.env_id]
        command += ["--total-timesteps", str(1024 * args.iterations), *flags, *extra]
        run_jobs([Job(f"{script} {' '.join(flags)}".strip(), command, log, workdir)], quiet=True, poll_seconds=0.2)
        os.remove(log)
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
    args, extra = cli(Args, __doc__, passthrough=True)
    output = results_path(args, "atari_sps.json")
    variants = {
        "ppo_atari.py": [],
        "ppo_atari_equi.py (channel-matched)": ["--trunk", "channels"],
        "ppo_atari_equi.py (parameter-matched)": ["--trunk", "params"],
    }
    sps: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, flags in variants.items():
            sps[name].append(training_sps(name.split()[0], args, flags, extra))
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
        "machine": machine_info(),
        "env_id": args.env_id,
        "settings": "script defaults (8 envs x 128 steps, 4 epochs x 4 minibatches), "
        + f"{args.iterations} iterations/run" + (f", extra flags {' '.join(extra)}" if extra else ""),
        "training": training,
        "env_throughput": throughput,
    }
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
