"""Steps per second of every training script eager vs `--compile`, on this machine.

Each script runs with small settings (below), eager and compiled alternately, `--repeats` times each, one run at a
time. From each run's TensorBoard events (the wall time of each logged scalar):

    steady SPS     environment steps per second after the second logged update (so compiling is not counted,
                   nor the one recompile of the optimizer step when the annealed learning rate first changes):
                   (last step - second step) / (last wall time - second wall time) of the SPS scalar
    first update   seconds from the start of the process to the first logged update; compiled minus eager is the
                   compile time (dynamo tracing + inductor's C++ or Triton builds; inductor's cache, kept across
                   runs, shortens it: `--cold-cache` measures a first run)

The results hold the median and min-max of each, the compiled / eager ratio of the medians, the load average
before and after every run, and the machine.

    uv run python benchmarks/compile_speed.py --device cpu --tag _cpu            # ~10 min on 2 cores
    uv run python benchmarks/compile_speed.py --scripts ppo_atari --repeats 5 -- --num-envs 16
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, Launch, Output, cli, companion, device_flags, fail, load_average,  # noqa: E402
                    machine_info, results_path, thread_env)

# Small settings per script: a few updates after the first, so the steady rate is measured over several of them.
SETTINGS = {
    "ppo_atari": ["--num-envs", "8", "--num-steps", "128", "--total-timesteps", str(6 * 1024)],
    "ppo_atari_equi": ["--num-envs", "8", "--num-steps", "128", "--total-timesteps", str(4 * 1024)],
    "rpo_mujoco": ["--env-id", "Hopper-v5", "--num-steps", "512", "--total-timesteps", str(8 * 512)],
    "dqn_equi_bullet": ["--workspace-size", "0.3", "--max-steps", "50", "--no-paper-tasks", "--image-size", "32",
                        "--n-hidden", "16", "--num-demos", "2", "--learning-starts", "64", "--buffer-size", "5000",
                        "--total-timesteps", "400", "--log-frequency", "10", "--eval-frequency", "100000",
                        "--eval-episodes", "1", "--num-eval-envs", "1"],
}


@dataclass
class Args(Output, Launch):
    scripts: list[str] = field(default_factory=lambda: list(SETTINGS))
    """the training scripts to measure"""
    repeats: int = 2
    """runs of each script per variant (eager, compiled), alternating"""
    threads: int = 1
    """OMP/MKL threads of each run (1: on a shared 2-core machine, two OpenMP threads wait for each other whenever
    another process holds a core, which makes small kernels up to 100x slower)"""
    nice: int = 10
    """niceness of the runs (0: none)"""
    cold_cache: bool = False
    """give every run an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so that the compile time is that of a
    first run on a machine; by default runs share the user's cache, as repeated runs of a user do"""


def event_series(run_dir: str, tag: str) -> list[tuple[float, int]]:
    """(wall time, step) of every event of scalar `tag` in the run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = []
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            series += [(e.wall_time, e.step) for e in acc.Scalars(tag)]
    return sorted(series)


def measure(script: str, compiled: bool, args: Args, extra: list[str]) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"compile_speed_{script}_")
    command = ([] if args.nice == 0 else ["nice", "-n", str(args.nice)]) + [
        sys.executable, os.path.join(REPO, f"{script}.py"), *SETTINGS[script], *device_flags(args.device),
        *(["--compile"] if compiled else []), *extra]
    env = {**os.environ, **thread_env(args.threads), "PYTHONWARNINGS": "ignore"}
    if args.cold_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(workdir, "inductor_cache")
    load_before = load_average()
    start = time.time()
    import subprocess

    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"{script} {'--compile' if compiled else 'eager'} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    run_dir = glob.glob(os.path.join(workdir, "runs", "*"))[0]
    series = event_series(run_dir, "charts/SPS")
    shutil.rmtree(workdir, ignore_errors=True)
    (t0, s0), (t1, s1) = series[1 if len(series) >= 4 else 0], series[-1]
    return {"script": script, "variant": "compile" if compiled else "eager", "steady_sps": (s1 - s0) / (t1 - t0),
            "first_update_s": series[0][0] - start, "wall_s": wall, "logged_updates": len(series),
            "sps_events": [(round(t - start, 3), step) for t, step in series],
            "load_before": load_before, "load_after": load_average()}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    args, extra = cli(Args, __doc__, passthrough=True)
    unknown = [s for s in args.scripts if s not in SETTINGS]
    if unknown:
        fail(f"unknown script {unknown[0]!r}; choose from {', '.join(SETTINGS)}.")
    if args.repeats < 1:
        fail(f"--repeats must be at least 1, not {args.repeats}.")
    path = results_path(args, "compile_speed.json", companions=(".csv",))
    runs = []
    for script in args.scripts:
        for repeat in range(args.repeats):
            for compiled in ((False, True) if repeat % 2 == 0 else (True, False)):
                result = measure(script, compiled, args, extra)
                runs.append(result)
                print(f"{script:16s} {result['variant']:8s} steady SPS {result['steady_sps']:8.1f}  first update "
                      f"{result['first_update_s']:6.1f} s  load {result['load_before'][0]:.2f}", flush=True)
    table = []
    for script in args.scripts:
        row = {"script": script, "settings": " ".join(SETTINGS[script] + extra)}
        for variant in ("eager", "compile"):
            mine = [r for r in runs if r["script"] == script and r["variant"] == variant]
            row[f"{variant}_sps"] = summary([r["steady_sps"] for r in mine])
            row[f"{variant}_first_update_s"] = summary([r["first_update_s"] for r in mine])
        row["speedup_median"] = row["compile_sps"]["median"] / row["eager_sps"]["median"]
        row["compile_time_s_median"] = (row["compile_first_update_s"]["median"]
                                        - row["eager_first_update_s"]["median"])
        table.append(row)
    record = {"benchmark": "compile_speed", "machine": machine_info(args.device), "device": args.device,
              "threads": args.threads, "nice": args.nice, "repeats": args.repeats, "cold_cache": args.cold_cache,
              "extra_flags": extra,
              "summary": table, "runs": runs}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["script", "eager_sps_median", "eager_sps_min", "eager_sps_max", "compile_sps_median",
                         "compile_sps_min", "compile_sps_max", "speedup_median", "compile_time_s_median"])
        for row in table:
            e, c = row["eager_sps"], row["compile_sps"]
            writer.writerow([row["script"], f"{e['median']:.1f}", f"{e['min']:.1f}", f"{e['max']:.1f}",
                             f"{c['median']:.1f}", f"{c['min']:.1f}", f"{c['max']:.1f}",
                             f"{row['speedup_median']:.3f}", f"{row['compile_time_s_median']:.1f}"])
    for row in table:
        print(f"{row['script']:16s} eager {row['eager_sps']['median']:8.1f}  compile {row['compile_sps']['median']:8.1f}"
              f"  x{row['speedup_median']:.2f}  compile time ~{row['compile_time_s_median']:.0f} s", flush=True)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
