"""Steps per second of every training script eager vs `--compile` (and the other speed flags), on this machine.

Each script runs with small settings (below) in each variant (`--variants`: eager, compile, and where the script has
them bf16, compile_bf16, nchw = without channels-last, cudagraphs), the variants in turn, `--repeats` rounds (the
order reversed every other round), one run at a time. From each run's TensorBoard events (the wall time of each
logged scalar):

    steady SPS     environment steps per second after the second logged update (so compiling is not counted):
                   (last step - second step) / (last wall time - second wall time) of the SPS scalar
    recompiles     how many times dynamo recompiled a function after its first compile, and the guards that failed
                   (from TORCH_LOGS=recompiles): a step recompiled at every update runs at compile speed
    first update   seconds from the start of the process to the first logged update; a variant's minus eager's is
                   its compile time (dynamo tracing + inductor's C++ or Triton builds; inductor's cache, kept across
                   runs, shortens it: `--cold-cache` measures a first run)

The results hold the median and min-max of each, each variant's ratio to eager (of the medians), the load average
before and after every run, and the machine.

    uv run python benchmarks/compile_speed.py --device cpu --tag _cpu            # ~10 min on 2 cores
    uv run python benchmarks/compile_speed.py --scripts ppo_atari --variants eager compile bf16 compile_bf16 nchw
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
    "sac_equi_bullet": ["--workspace-size", "0.3", "--max-steps", "50", "--no-paper-tasks", "--group-order", "4",
                        "--n-hidden", "16", "--image-size", "64", "--batch-size", "32", "--num-demos", "2",
                        "--learning-starts", "64", "--buffer-size", "5000", "--total-timesteps", "400",
                        "--log-frequency", "10", "--eval-frequency", "100000", "--eval-episodes", "1",
                        "--num-eval-envs", "1"],
    # the offline scripts train on their cached default dataset (built before the runs: `prepare`)
    **{script: ["--group-order", "4", "--n-hidden", "16", "--image-size", "64", "--batch-size", "32",
                "--total-timesteps", "200", "--log-frequency", "10", "--eval-frequency", "100000", "--eval-episodes",
                "1", "--num-eval-envs", "1"] for script in ("cql_equi_offline", "iql_equi_offline")},
}
OFFLINE = ("cql_equi_offline", "iql_equi_offline")


# The flags of each variant (eager first: the others are compared to it).
VARIANTS = {"eager": [], "compile": ["--compile"], "bf16": ["--bf16"], "compile_bf16": ["--compile", "--bf16"],
            "nchw": ["--no-channels-last"], "cudagraphs": ["--cudagraphs"], "cudagraphs_bf16": ["--cudagraphs", "--bf16"]}


@dataclass
class Args(Output, Launch):
    scripts: list[str] = field(default_factory=lambda: list(SETTINGS))
    """the training scripts to measure"""
    variants: list[str] = field(default_factory=lambda: ["eager", "compile"])
    """the variants to run (eager always runs: the ratios are to it)"""
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


def measure(script: str, variant: str, args: Args, extra: list[str]) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"compile_speed_{script}_")
    command = ([] if args.nice == 0 else ["nice", "-n", str(args.nice)]) + [
        sys.executable, os.path.join(REPO, f"{script}.py"), *SETTINGS[script], *device_flags(args.device),
        *VARIANTS[variant], *extra]
    env = {**os.environ, **thread_env(args.threads), "PYTHONWARNINGS": "ignore", "TORCH_LOGS": "recompiles"}
    if args.cold_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(workdir, "inductor_cache")
    load_before = load_average()
    start = time.time()
    import subprocess

    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"{script} {variant} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    run_dir = glob.glob(os.path.join(workdir, "runs", "*"))[0]
    series = event_series(run_dir, "charts/SPS")
    shutil.rmtree(workdir, ignore_errors=True)
    (t0, s0), (t1, s1) = series[1 if len(series) >= 4 else 0], series[-1]
    # dynamo's log of every recompile and the guard that failed: a compiled step that recompiles at every update
    # (a changing Python float baked into the graph, say) is slow for that reason alone
    lines = proc.stderr.splitlines()
    recompiles = [lines[i + 2].split("[__recompiles]")[-1].strip() if i + 2 < len(lines) else ""
                  for i, line in enumerate(lines) if "Recompiling function" in line]
    return {"script": script, "variant": variant, "steady_sps": (s1 - s0) / (t1 - t0),
            "recompiles": len(recompiles), "recompile_guards": recompiles[:5],
            "first_update_s": series[0][0] - start, "wall_s": wall, "logged_updates": len(series),
            "sps_events": [(round(t - start, 3), step) for t, step in series],
            "load_before": load_before, "load_after": load_average()}


def prepare(script: str, args: Args, extra: list[str]) -> None:
    """An offline script's default dataset is built on its first run and cached: a run of 0 gradient steps builds it
    here (with one gradient step), so that no measured run's first update includes building it."""
    if script in OFFLINE:
        import subprocess

        command = [sys.executable, os.path.join(REPO, f"{script}.py"), *SETTINGS[script], *device_flags(args.device),
                   *extra, "--total-timesteps", "1"]
        with tempfile.TemporaryDirectory(prefix=f"compile_speed_{script}_") as workdir:
            subprocess.run(command, cwd=workdir, env={**os.environ, **thread_env(args.threads)}, check=True,
                           capture_output=True)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    args, extra = cli(Args, __doc__, passthrough=True)
    unknown = [s for s in args.scripts if s not in SETTINGS]
    if unknown:
        fail(f"unknown script {unknown[0]!r}; choose from {', '.join(SETTINGS)}.")
    if args.repeats < 1:
        fail(f"--repeats must be at least 1, not {args.repeats}.")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        fail(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}.")
    variants = ["eager"] + [v for v in dict.fromkeys(args.variants) if v != "eager"]
    path = results_path(args, "compile_speed.json", companions=(".csv",))
    runs = []
    for script in args.scripts:
        prepare(script, args, extra)
        for repeat in range(args.repeats):
            for variant in (variants if repeat % 2 == 0 else variants[::-1]):
                result = measure(script, variant, args, extra)
                runs.append(result)
                print(f"{script:16s} {result['variant']:14s} steady SPS {result['steady_sps']:8.1f}  first update "
                      f"{result['first_update_s']:6.1f} s  recompiles {result['recompiles']}  load "
                      f"{result['load_before'][0]:.2f}", flush=True)
    table = []
    for script in args.scripts:
        for variant in variants:
            mine = [r for r in runs if r["script"] == script and r["variant"] == variant]
            eager = [r for r in runs if r["script"] == script and r["variant"] == "eager"]
            row = {"script": script, "variant": variant, "flags": " ".join(VARIANTS[variant]),
                   "settings": " ".join(SETTINGS[script] + extra),
                   "sps": summary([r["steady_sps"] for r in mine]),
                   "first_update_s": summary([r["first_update_s"] for r in mine]),
                   "recompiles_max": max(r["recompiles"] for r in mine)}
            row["ratio_to_eager"] = row["sps"]["median"] / statistics.median(r["steady_sps"] for r in eager)
            row["compile_time_s"] = row["first_update_s"]["median"] - statistics.median(
                r["first_update_s"] for r in eager)
            table.append(row)
    record = {"benchmark": "compile_speed", "machine": machine_info(args.device), "device": args.device,
              "threads": args.threads, "nice": args.nice, "repeats": args.repeats, "cold_cache": args.cold_cache,
              "variants": {v: VARIANTS[v] for v in variants}, "extra_flags": extra,
              "summary": table, "runs": runs}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["script", "variant", "sps_median", "sps_min", "sps_max", "ratio_to_eager",
                         "compile_time_s_median", "recompiles_max"])
        for row in table:
            writer.writerow([row["script"], row["variant"], f"{row['sps']['median']:.1f}", f"{row['sps']['min']:.1f}",
                             f"{row['sps']['max']:.1f}", f"{row['ratio_to_eager']:.3f}", f"{row['compile_time_s']:.1f}",
                             row["recompiles_max"]])
    for row in table:
        print(f"{row['script']:16s} {row['variant']:14s} {row['sps']['median']:8.1f} SPS  x{row['ratio_to_eager']:.2f}"
              f"  compile time ~{row['compile_time_s']:.0f} s", flush=True)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
