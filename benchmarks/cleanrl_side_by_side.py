"""ppo_atari.py (eager, --compile, --bf16) and ppo_atari_equi.py side by side with CleanRL's own ppo_atari.py and
ppo_atari_envpool.py, on this machine, in CleanRL's own environment.

CleanRL is not part of this project: pass the path of a CleanRL checkout (`git clone
https://github.com/vwxyzjn/cleanrl`). The benchmark builds CleanRL's environment in a separate virtual environment
with uv (gymnasium 0.29, ale-py 0.9, gym 0.23 + envpool, torch at this project's version; `--cleanrl-python` uses an
existing interpreter instead), copies CleanRL's scripts to a temporary folder and applies the few adaptations this
machine needs to that copy (listed in the results, with the reason for each; the checkout is never changed).

Every variant runs with the same settings (CleanRL's defaults: 8 envs x 128 steps, 4 minibatches x 4 epochs;
Breakout), one run at a time, the variants in turn, `--repeats` rounds with the order rotated each round. From
each run's TensorBoard events (all scripts log `charts/SPS` once per update), the steady steps per second after the
first update: (last step - first step) / (last wall time - first wall time). The results hold the median and
min-max per variant, each variant's ratio to CleanRL's ppo_atari.py and to its envpool variant, the load average
around every run, the versions and the adaptations; a variant that cannot run here (e.g. no envpool wheel) is
recorded as such, with the reason.

    uv run python benchmarks/cleanrl_side_by_side.py --cleanrl-path /tmp/cleanrl --device cpu --tag _cpu
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, Launch, Output, cli, companion, fail, load_average, machine_info,  # noqa: E402
                    results_path, thread_env)
from compile_speed import event_series  # noqa: E402

# Our variants: the script and its flags (channels-last minibatches are the default of both scripts).
OURS = {"ours": ("ppo_atari.py", []), "ours_bf16": ("ppo_atari.py", ["--bf16"]),
        "ours_compile": ("ppo_atari.py", ["--compile"]), "ours_compile_bf16": ("ppo_atari.py", ["--compile", "--bf16"]),
        "ours_cudagraphs": ("ppo_atari.py", ["--cudagraphs"]),
        "ours_equi": ("ppo_atari_equi.py", []), "ours_equi_bf16": ("ppo_atari_equi.py", ["--bf16"])}
VARIANTS = ("cleanrl", "cleanrl_envpool", *OURS)
# CleanRL's environment: its pyproject's gymnasium and gym; ale-py 0.9 (the first with the ROMs in the wheel, which
# a machine without internet access to the ROM download needs); envpool 0.8.4 for its envpool script (CleanRL pins
# envpool<0.7, which has no wheel for Python 3.11; 0.8.4 is the last whose env lets the script set `num_envs`, which
# envpool 1.x makes read-only).
CLEANRL_PACKAGES = ["gymnasium==0.29.1", "ale-py==0.9.0", "gym==0.23.1", "numpy<2", "tyro", "tensorboard",
                    "opencv-python-headless<4.11", "envpool==0.8.4"]


@dataclass
class Args(Output, Launch):
    cleanrl_path: str = ""
    """a CleanRL checkout (its cleanrl/ppo_atari.py and cleanrl/ppo_atari_envpool.py are run from a copy)"""
    cleanrl_python: Optional[str] = None
    """a python that already has CleanRL's packages (default: build one with uv in --env-dir)"""
    cleanrl_pythonpath: str = ""
    """folders put on PYTHONPATH for CleanRL's runs only (CleanRL's packages unpacked next to a python that lacks
    them, e.g. on a GPU node without uv or internet)"""
    env_dir: str = os.path.join(tempfile.gettempdir(), "cleanrl_env")
    """where the virtual environment for CleanRL is built (reused when it exists)"""
    variants: list[str] = field(default_factory=lambda: ["cleanrl", "cleanrl_envpool", "ours", "ours_compile",
                                                         "ours_compile_bf16", "ours_equi", "ours_equi_bf16"])
    """the variants to run"""
    total_timesteps: int = 6 * 1024
    """environment steps per run"""
    num_envs: int = 8
    num_steps: int = 128
    repeats: int = 3
    """rounds of all variants"""
    threads: int = 1
    """OMP/MKL threads of each run, the same for every variant (1: see compile_speed.py's --threads)"""
    nice: int = 10
    """niceness of the runs (0: none)"""


def sh(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def build_cleanrl_env(args: Args) -> tuple[str, dict]:
    """The python with CleanRL's packages (built with uv unless given) and the record of how it was made."""
    if args.cleanrl_python:
        return args.cleanrl_python, {"python": args.cleanrl_python, "built": False}
    python = os.path.join(args.env_dir, "bin", "python")
    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    record = {"python": python, "built": True, "requested": CLEANRL_PACKAGES + [torch_pin], "missing": {},
              "differs_from_cleanrl_pins": {"ale-py": "0.9.0, not 0.8.1: ROMs in the wheel (no ROM download here)",
                                            "envpool": "0.8.4, not <0.7: no Python 3.11 wheel below 0.8",
                                            "torch": f"{torch_pin}, this project's version, not 2.4.1"}}
    if not os.path.exists(python):
        proc = sh(["uv", "venv", args.env_dir, "-p", "3.11"])
        if proc.returncode != 0:
            fail(f"could not create {args.env_dir} with uv: {proc.stderr.strip()[-500:]}")
    proc = sh(["uv", "pip", "install", "--python", python, *CLEANRL_PACKAGES, torch_pin])
    if proc.returncode != 0:  # most likely envpool (Linux x86-64 wheels only): install the rest, record it
        record["missing"]["envpool"] = proc.stderr.strip()[-800:]
        proc = sh(["uv", "pip", "install", "--python", python,
                   *[p for p in CLEANRL_PACKAGES if not p.startswith("envpool")],
                   torch_pin])
        if proc.returncode != 0:
            fail(f"could not install CleanRL's packages into {args.env_dir}: {proc.stderr.strip()[-800:]}")
    return python, record


def versions(python: str, packages: tuple[str, ...], pythonpath: str = "") -> dict:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor p in sys.argv[1:]:\n    try: out[p] = "
            "m.version(p)\n    except Exception: out[p] = None\nprint(json.dumps(out))")
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    proc = sh([python, "-c", code, *packages], env=env)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-300:]}


def copy_cleanrl(cleanrl_path: str, python: str, pythonpath: str = "") -> tuple[str, list[dict]]:
    """A temporary copy of CleanRL's two scripts and cleanrl_utils with this machine's adaptations applied."""
    for rel in ("cleanrl/ppo_atari.py", "cleanrl/ppo_atari_envpool.py", "cleanrl_utils"):
        if not os.path.exists(os.path.join(cleanrl_path, rel)):
            fail(f"{cleanrl_path} is not a CleanRL checkout: it has no {rel}.")
    root = tempfile.mkdtemp(prefix="cleanrl_copy_")
    shutil.copytree(os.path.join(cleanrl_path, "cleanrl_utils"), os.path.join(root, "cleanrl_utils"))
    os.makedirs(os.path.join(root, "cleanrl"))
    for name in ("ppo_atari.py", "ppo_atari_envpool.py"):
        shutil.copy(os.path.join(cleanrl_path, "cleanrl", name), os.path.join(root, "cleanrl", name))
    adaptations = []
    probe = sh([python, "-c", "import gymnasium as gym; gym.make('BreakoutNoFrameskip-v4')"],
               env={**os.environ, "PYTHONPATH": pythonpath})
    if probe.returncode != 0:  # ale-py 0.9 registers its envs on import, not through gymnasium 0.29's plugin hook
        path = os.path.join(root, "cleanrl", "ppo_atari.py")
        text = open(path).read()
        text = text.replace("import gymnasium as gym\n", "import gymnasium as gym\nimport ale_py  # noqa: F401\n", 1)
        open(path, "w").write(text)
        adaptations.append({"file": "cleanrl/ppo_atari.py", "change": "added `import ale_py` after `import "
                            "gymnasium as gym`", "reason": "gym.make('BreakoutNoFrameskip-v4') fails without it: "
                            + probe.stderr.strip().splitlines()[-1][:200]})
    return root, adaptations


def command_for(variant: str, args: Args, python: str, cleanrl_copy: str) -> tuple[list[str], dict]:
    common = ["--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps),
              "--total-timesteps", str(args.total_timesteps), "--seed", "1"]
    cuda = ["--no-cuda"] if args.device == "cpu" else []
    env = {**thread_env(args.threads), "PYTHONWARNINGS": "ignore"}
    if variant.startswith("cleanrl"):
        script = "ppo_atari_envpool.py" if variant == "cleanrl_envpool" else "ppo_atari.py"
        env_id = "Breakout-v5" if variant == "cleanrl_envpool" else "BreakoutNoFrameskip-v4"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (cleanrl_copy, args.cleanrl_pythonpath) if p)
        return [python, os.path.join(cleanrl_copy, "cleanrl", script), "--env-id", env_id, *common, *cuda], env
    script, extra = OURS[variant]
    return [sys.executable, os.path.join(REPO, script), "--env-id", "BreakoutNoFrameskip-v4", *common, *cuda,
            *extra], env


def run_one(variant: str, command: list[str], env: dict, nice: int) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"side_by_side_{variant}_")
    before = load_average()
    start = time.time()
    full = ([] if nice == 0 else ["nice", "-n", str(nice)]) + command
    proc = subprocess.run(full, cwd=workdir, env={**os.environ, **env}, capture_output=True, text=True)
    result = {"variant": variant, "returncode": proc.returncode, "wall_s": time.time() - start,
              "load_before": before, "load_after": load_average()}
    run_dirs = glob.glob(os.path.join(workdir, "runs", "*"))
    series = event_series(run_dirs[0], "charts/SPS") if proc.returncode == 0 and run_dirs else []
    if len(series) >= 2:
        (t0, s0), (t1, s1) = series[0], series[-1]
        result.update(steady_sps=(s1 - s0) / (t1 - t0), first_update_s=t0 - start)
    else:
        result["error"] = (proc.stdout[-800:] + proc.stderr[-1500:]).strip()
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def main() -> None:
    args = cli(Args, __doc__)
    if not args.cleanrl_path:
        fail("pass --cleanrl-path, a CleanRL checkout (git clone https://github.com/vwxyzjn/cleanrl).")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        fail(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}.")
    path = results_path(args, "cleanrl_side_by_side.json", companions=(".csv",))
    python, env_record = build_cleanrl_env(args)
    cleanrl_copy, adaptations = copy_cleanrl(os.path.abspath(args.cleanrl_path), python, args.cleanrl_pythonpath)
    commit = sh(["git", "-C", args.cleanrl_path, "rev-parse", "HEAD"]).stdout.strip() or None
    runs, skipped = [], {}
    if "envpool" in env_record.get("missing", {}):
        skipped["cleanrl_envpool"] = "envpool could not be installed: " + env_record["missing"]["envpool"]
    variants = [v for v in args.variants if v not in skipped]
    for round_ in range(args.repeats):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            command, env = command_for(variant, args, python, cleanrl_copy)
            result = run_one(variant, command, env, args.nice)
            result["round"] = round_
            runs.append(result)
            sps = result.get("steady_sps")
            print(f"round {round_} {variant:16s} " + (f"steady SPS {sps:7.1f}" if sps else "FAILED")
                  + f"  load {result['load_before'][0]:.2f}", flush=True)
    summary = {}
    for variant in variants:
        values = [r["steady_sps"] for r in runs if r["variant"] == variant and "steady_sps" in r]
        if values:
            summary[variant] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                "n": len(values)}
        else:
            summary[variant] = {"error": next(r.get("error") for r in runs if r["variant"] == variant)}
    for base in ("cleanrl", "cleanrl_envpool"):
        if "median" in summary.get(base, {}):
            for variant, row in summary.items():
                if "median" in row:
                    row[f"ratio_to_{base}"] = row["median"] / summary[base]["median"]
    record = {"benchmark": "cleanrl_side_by_side", "machine": machine_info(args.device), "device": args.device,
              "settings": {"total_timesteps": args.total_timesteps, "num_envs": args.num_envs,
                           "num_steps": args.num_steps, "threads": args.threads, "nice": args.nice,
                           "repeats": args.repeats, "game": "Breakout"},
              "cleanrl": {"path": os.path.abspath(args.cleanrl_path), "commit": commit, "environment": env_record,
                          "versions": versions(python, ("torch", "gymnasium", "gym", "ale-py", "envpool", "numpy",
                                                        "tyro"), args.cleanrl_pythonpath),
                          "adaptations": adaptations},
              "ours_versions": versions(sys.executable, ("torch", "gymnasium", "ale-py", "numpy", "escnn")),
              "skipped": skipped, "summary": summary, "runs": runs}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    with open(companion(path, ".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "sps_median", "sps_min", "sps_max", "ratio_to_cleanrl", "ratio_to_cleanrl_envpool"])
        for variant, row in summary.items():
            writer.writerow([variant, *(f"{row[k]:.3f}" if k in row else "" for k in
                                        ("median", "min", "max", "ratio_to_cleanrl", "ratio_to_cleanrl_envpool"))])
    shutil.rmtree(cleanrl_copy, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
