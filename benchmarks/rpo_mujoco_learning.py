"""Learning curves of rpo_mujoco.py on MuJoCo v5 tasks, next to CleanRL's published RPO results.

Two steps, so the long runs can go in the background and be collected later:

    # train (one process per env x seed, `--parallel` at a time, each with `--threads` BLAS/OpenMP threads)
    nohup uv run python benchmarks/rpo_mujoco_learning.py run > rpo_bench.log 2>&1 &
    # read the runs' own TensorBoard scalars and write benchmarks/results/rpo_mujoco_learning.{csv,json,png}
    uv run python benchmarks/rpo_mujoco_learning.py collect --overwrite
    # a tiny check: flags after `--` go to every rpo_mujoco.py run; --out keeps the committed results
    uv run python benchmarks/rpo_mujoco_learning.py run --workdir /tmp/rpo_check --env-ids Hopper-v5 --seeds 1 \
        --total-timesteps 2048 -- --num-steps 512
    uv run python benchmarks/rpo_mujoco_learning.py collect --workdir /tmp/rpo_check --total-timesteps 2048 \
        --out /tmp/rpo_check/rpo_mujoco_learning.json

Every run uses the script's defaults except `--total-timesteps 1001472` (489 rollouts of 2048 steps, the first
whole number of rollouts past 1M; the learning rate therefore anneals to zero at 1M steps, not at 8M as in CleanRL's
runs) and `--save-model`, so each run also reports the deterministic return
of its saved policy with the saved, frozen normalisation statistics.
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, Job, Launch, Output, cli, companion, device_flags, fail, load_average, load_script,  # noqa: E402
                    results_path, run_jobs, thread_env)

DEFAULT_WORKDIR = os.path.join(REPO, "runs", "rpo_mujoco_benchmark")  # runs/ is git-ignored

# CleanRL's published RPO returns (docs/rl-algorithms/rpo.md, MuJoCo v4, 8M steps, 10 seeds, mean +- std of the
# average return over the last 100 training episodes). CleanRL publishes no RPO values at 1M steps; its
# ppo_continuous_action benchmark at 1M steps (3 seeds, same networks, LR annealed over 1M) is the closest anchor.
PUBLISHED = {
    "HalfCheetah": {
        "rpo_8M_alpha_0.5": [2163.57, 790.16],
        "rpo_8M_alpha_0.01": [2716.51, 1314.93],
        "ppo_continuous_1M": [1442.64, 46.03],
    },
    "Hopper": {
        "rpo_8M_alpha_0.5": [1557.18, 206.74],
        "rpo_8M_alpha_0.01": [2334.22, 441.89],
        "ppo_continuous_1M": [2382.86, 271.74],
    },
}


@dataclass
class Common:
    workdir: str = DEFAULT_WORKDIR
    """where the runs' runs/ folder and logs go"""
    # 489 rollouts of 2048 steps: the smallest whole number of iterations that reaches 1M steps (the script, like
    # CleanRL, runs total_timesteps // batch_size iterations, so 1_000_000 would stop at 999,424).
    total_timesteps: int = 489 * 2048
    """environment steps per run (489 rollouts of 2048: the first whole number of rollouts past 1M)"""


@dataclass
class RunArgs(Common, Launch):
    """Train: one rpo_mujoco.py process per env x seed (flags after `--` go to every run)."""

    device: Literal["cuda", "cpu"] = "cpu"
    """cpu: every run gets --no-cuda (the committed runs); cuda: the script's default (the GPU when there is one)"""
    parallel: int = 2
    """runs at the same time (one core each)"""
    env_ids: tuple[str, ...] = ("HalfCheetah-v5", "Hopper-v5")
    """MuJoCo tasks"""
    seeds: tuple[int, ...] = (1, 2)
    """seeds of every task"""


@dataclass
class CollectArgs(Common, Output):
    """Read the runs' TensorBoard scalars and write rpo_mujoco_learning<tag>.{json,csv,png}."""

    hardware_note: str = "2 logical cores shared with other jobs during the runs"
    """what else ran on the machine, for the record"""


def run(args: RunArgs, extra: list[str]) -> None:
    os.makedirs(args.workdir, exist_ok=True)
    jobs = []
    for env_id in args.env_ids:
        for seed in args.seeds:
            command = [
                sys.executable, os.path.join(REPO, "rpo_mujoco.py"), "--env-id", env_id, "--seed", str(seed),
                "--total-timesteps", str(args.total_timesteps), "--save-model", *device_flags(args.device), *extra,
            ]
            jobs.append(Job(f"{env_id} seed {seed}", command, os.path.join(args.workdir, f"{env_id}__seed{seed}.log"),
                            args.workdir, thread_env(args.threads)))
    run_jobs(jobs, args.parallel, hint="`collect` summarises the runs that finished")


def read_scalars(run_dir: str) -> tuple[dict[str, list[tuple[int, float]]], list[float]]:
    """TensorBoard scalars of one run as {tag: [(step, value)]}, plus the wall times of all its scalar events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    wall_times: list[float] = []
    for event_file in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        accumulator = EventAccumulator(event_file, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events = accumulator.Scalars(tag)
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events)
            wall_times.extend(e.wall_time for e in events)
    return scalars, wall_times


def fresh_normaliser_return(model_path: str, env_id: str, episodes: int = 10, seed: int = 1) -> float:
    """Mean return of a saved policy evaluated the way CleanRL evaluates: a fresh observation normaliser (mean 0,
    variance 1) that keeps updating during the evaluation, instead of the saved, frozen training statistics."""
    import gymnasium as gym
    import torch

    rpo_mujoco = load_script("rpo_mujoco")

    agent, _, saved_args = rpo_mujoco.load_policy(model_path, "cpu")
    envs = gym.vector.SyncVectorEnv([rpo_mujoco.make_env(env_id, 0, False, "", saved_args["gamma"])],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=seed)
    returns = []
    while len(returns) < episodes:
        with torch.no_grad():
            action = agent.actor_mean(torch.as_tensor(obs, dtype=torch.float32))
        obs, _, _, _, infos = envs.step(action.numpy())
        if "final_info" in infos and infos["final_info"]["_episode"][0]:
            returns.append(float(infos["final_info"]["episode"]["r"][0]))
    envs.close()
    return float(np.mean(returns))


def hardware() -> dict:
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import gymnasium
    import mujoco
    import torch

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "gpu": "none (CPU run, --no-cuda)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "mujoco": mujoco.__version__,
        "load_average_at_collect": load_average(),
    }


def collect(args: CollectArgs) -> None:
    out = results_path(args, "rpo_mujoco_learning.json", (".csv", ".png"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pattern = re.compile(r"^(?P<env>.+?)__(?P<exp>.+)__(?P<seed>\d+)__(?P<time>\d+)$")
    runs = []
    for run_dir in sorted(glob.glob(os.path.join(args.workdir, "runs", "*"))):
        match = pattern.match(os.path.basename(run_dir))
        if not match:
            continue
        scalars, wall_times = read_scalars(run_dir)
        if "charts/episodic_return" not in scalars:
            continue
        curve = sorted(scalars["charts/episodic_return"])
        last_step = max(step for step, _ in scalars.get("charts/SPS", curve))
        final = [value for _, value in curve[-100:]]
        eval_returns = [value for _, value in sorted(scalars.get("eval/episodic_return", []))]
        model_path = os.path.join(run_dir, "rpo_mujoco.cleanrl_model")
        fresh = None
        if eval_returns and os.path.exists(model_path):
            fresh = fresh_normaliser_return(model_path, match["env"])
        runs.append({
            "env_id": match["env"],
            "seed": int(match["seed"]),
            "run_dir": os.path.relpath(run_dir, REPO),
            "global_step": last_step,
            "finished": last_step >= args.total_timesteps - 2048 and bool(eval_returns),
            "return_last_100_episodes": float(np.mean(final)),
            "return_last_10_episodes": float(np.mean([value for _, value in curve[-10:]])),
            "episodes": len(curve),
            "eval_return_deterministic_10ep": float(np.mean(eval_returns)) if eval_returns else None,
            "eval_return_fresh_normaliser_10ep": fresh,
            "sps": float(scalars["charts/SPS"][-1][1]) if "charts/SPS" in scalars else None,
            "wall_minutes": (max(wall_times) - min(wall_times)) / 60 if wall_times else None,
            "curve": curve,
        })
    if not runs:
        raise SystemExit(f"no finished runs with episodic returns under {args.workdir}/runs")

    with open(companion(out, ".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_id", "seed", "global_step", "episodic_return"])
        for r in runs:
            writer.writerows([r["env_id"], r["seed"], step, round(value, 3)] for step, value in r["curve"])

    env_ids = sorted({r["env_id"] for r in runs})
    summary = {}
    for env_id in env_ids:
        env_runs = [r for r in runs if r["env_id"] == env_id and r["finished"]]
        if not env_runs:
            continue
        finals = [r["return_last_100_episodes"] for r in env_runs]
        evals = [r["eval_return_deterministic_10ep"] for r in env_runs]
        evals = [value for value in evals if value is not None]
        summary[env_id] = {
            "seeds": [r["seed"] for r in env_runs],
            "return_last_100_episodes_mean": float(np.mean(finals)),
            "return_last_100_episodes_std": float(np.std(finals)),
            "return_last_10_episodes_mean": float(np.mean([r["return_last_10_episodes"] for r in env_runs])),
            "eval_return_deterministic_mean": float(np.mean(evals)) if evals else None,
            "eval_return_fresh_normaliser_mean": float(
                np.mean([r["eval_return_fresh_normaliser_10ep"] for r in env_runs])
            ),
            "sps_mean": float(np.mean([r["sps"] for r in env_runs])),
            "cleanrl_published": PUBLISHED.get(env_id.split("-")[0], {}),
        }
    report = {
        "what": "rpo_mujoco.py learning curves (charts/episodic_return of the runs' own TensorBoard files)",
        "command": f"OMP_NUM_THREADS=1 python rpo_mujoco.py --env-id <env> --seed <seed> --total-timesteps "
        f"{args.total_timesteps} --save-model --no-cuda (other flags at their defaults: rpo_alpha 0.5, 1 env x 2048)",
        "metric": "return_last_100_episodes = mean raw episodic return of the last 100 training episodes (CleanRL's "
        "table metric; for HalfCheetah the steps 900k-1M); return_last_10_episodes likewise for the last 10; "
        "eval_return_deterministic = mean of 10 episodes of the saved policy's mean action with its "
        "saved, frozen normalisation statistics; eval_return_fresh_normaliser = the same saved policy evaluated as "
        "CleanRL evaluates (a fresh observation normaliser that keeps updating), to show what restoring the "
        "statistics is worth",
        "date": datetime.date.today().isoformat(),
        "hardware": {**hardware(), "note": args.hardware_note},
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=2)

    fig, axes = plt.subplots(1, len(env_ids), figsize=(6 * len(env_ids), 4.2), squeeze=False)
    for ax, env_id in zip(axes[0], env_ids, strict=True):
        for r in (r for r in runs if r["env_id"] == env_id):  # unfinished runs are drawn too, labelled as such
            steps = np.array([s for s, _ in r["curve"]])
            values = np.array([v for _, v in r["curve"]])
            window = max(1, min(100, len(values) // 50))  # moving average over about 2% of the run's episodes
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            status = "" if r["finished"] else f" (unfinished, {r['global_step']} steps)"
            line, = ax.plot(steps[window - 1 :], smooth, linewidth=1.5,
                            label=f"ours (v5), seed {r['seed']}{status}, {window}-episode mean")
            ax.plot(steps, values, alpha=0.12, linewidth=0.5, color=line.get_color())
        published = PUBLISHED.get(env_id.split("-")[0], {})
        styles = {"rpo_8M_alpha_0.5": ("k", "--", "CleanRL RPO α=0.5, final at 8M (v4)"),
                  "rpo_8M_alpha_0.01": ("gray", "--", "CleanRL RPO α=0.01, final at 8M (v4)"),
                  "ppo_continuous_1M": ("tab:red", ":", "CleanRL PPO-continuous, final at 1M (v4)")}
        for key, (mean, _) in published.items():
            color, style, label = styles[key]
            ax.axhline(mean, color=color, linestyle=style, linewidth=1.2, label=f"{label}: {mean:.0f}")
        ax.set_title(f"{env_id}, rpo_mujoco.py (α=0.5, LR annealed over {args.total_timesteps / 1e6:.2f}M)")
        ax.set_xlabel("global step")
        ax.set_ylabel("episodic return (training, raw)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    hw = report["hardware"]
    fig.suptitle(f"{hw['cpu']}, {hw['logical_cores']} logical cores, CPU only; {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(companion(out, ".png"), dpi=120)

    print("| task | seeds | return, last 100 episodes at 1M | eval, saved statistics | eval, fresh normaliser | SPS "
          "| CleanRL RPO α=0.5 at 8M (v4) |")
    print("|---|---|---|---|---|---|---|")
    for env_id, s in summary.items():
        published = s["cleanrl_published"].get("rpo_8M_alpha_0.5", [float("nan"), float("nan")])
        eval_mean = s["eval_return_deterministic_mean"]
        eval_text = "-" if eval_mean is None else f"{eval_mean:.1f}"
        spread = f" ± {s['return_last_100_episodes_std']:.1f}" if len(s["seeds"]) > 1 else ""
        print(f"| {env_id} | {', '.join(map(str, s['seeds']))} | {s['return_last_100_episodes_mean']:.1f}{spread} | "
              f"{eval_text} | {s['eval_return_fresh_normaliser_mean']:.1f} | {s['sps_mean']:.0f} | "
              f"{published[0]:.1f} ± {published[1]:.1f} |")
    for r in runs:
        if not r["finished"]:
            print(f"note: {r['run_dir']} stopped at step {r['global_step']} (still running or killed)")


if __name__ == "__main__":
    Command = Union[Annotated[RunArgs, tyro.conf.subcommand("run")],
                    Annotated[CollectArgs, tyro.conf.subcommand("collect")]]
    parsed, extra = cli(Command, __doc__, passthrough=True)
    if isinstance(parsed, RunArgs):
        run(parsed, extra)
    else:
        if extra:
            fail("flags after `--` go to the training runs of `run`; `collect` takes none.")
        collect(parsed)
