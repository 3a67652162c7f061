"""Learning curves of ppo_atari.py vs ppo_atari_equi.py from their TensorBoard logs, compared at equal steps.

Start the runs (one per script and seed, in the background or on a cluster), then point this at their `runs/`:

    uv run python ppo_atari.py --env-id BreakoutNoFrameskip-v4 --seed 1
    uv run python ppo_atari_equi.py --env-id BreakoutNoFrameskip-v4 --seed 1
    uv run python benchmarks/atari_learning.py --runs runs --env-id BreakoutNoFrameskip-v4

Writes `benchmarks/results/atari_learning_<game><tag>.{csv,json,png}` (or --out and its .csv/.png; existing results
only with --overwrite): the mean episodic return (raw game score) in bins of `bin_steps` environment steps, per
script, up to the step every run of the comparison has reached.
"""

import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Output, cli, companion, results_path  # noqa: E402


@dataclass
class Args(Output):
    runs: str = "runs"
    """folder holding the run directories"""
    env_id: str = "BreakoutNoFrameskip-v4"
    """the game whose runs to compare"""
    bin_steps: int = 50_000
    """width of the step bins that returns are averaged over"""
    hardware: str = "2-core AMD EPYC CPU (shared), no GPU"
    """what the runs ran on, for the record"""
    comparison: str = "PPO, Nature CNN vs mirror-equivariant"
    """what the runs compare, for the plot's title"""


def read_run(run_dir: str) -> dict | None:
    """A run's returns, last step and final SPS; None for a run stopped before its first update (no scalars yet)."""
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = accumulator.Tags()["scalars"]

    def scalars(tag: str) -> list:
        return accumulator.Scalars(tag) if tag in logged else []

    returns = [(e.step, e.value) for e in scalars("charts/episodic_return")]
    sps = [e.value for e in scalars("charts/SPS")]
    steps = [s for s, _ in returns] + [e.step for e in scalars("charts/SPS")]
    if not steps:
        return None
    return {"returns": returns, "last_step": max(steps), "sps": sps[-1] if sps else float("nan")}


def game_name(env_id: str) -> str:
    return env_id.split("NoFrameskip")[0].replace("ALE/", "").replace("-v5", "").lower()


if __name__ == "__main__":
    args = cli(Args, __doc__)
    out = results_path(args, f"atari_learning_{game_name(args.env_id)}.json", (".csv", ".png"))
    runs: dict[str, list[dict]] = {}
    for run_dir in sorted(glob.glob(os.path.join(args.runs, f"{args.env_id}__*"))):
        match = re.fullmatch(rf"{re.escape(args.env_id)}__(.+)__(\d+)__\d+", os.path.basename(run_dir))
        run = read_run(run_dir) if match else None
        if match and run is None:
            print(f"note: {run_dir} logged nothing yet (stopped before its first update); left out")
        elif match:
            runs.setdefault(match.group(1), []).append({"seed": int(match.group(2)), **run})
    if not runs:
        raise SystemExit(f"error: no runs of {args.env_id} under {args.runs!r}.")
    common_step = min(run["last_step"] for group in runs.values() for run in group)
    edges = np.arange(0, common_step + 1, args.bin_steps)
    table = {"step": (edges[1:]).tolist()}
    summary = {}
    for name, group in runs.items():
        steps = np.array([s for run in group for s, _ in run["returns"]])
        values = np.array([v for run in group for _, v in run["returns"]])
        means = [
            float(values[(steps > lo) & (steps <= hi)].mean()) if ((steps > lo) & (steps <= hi)).any() else float("nan")
            for lo, hi in zip(edges[:-1], edges[1:])
        ]
        table[name] = means
        summary[name] = {
            "seeds": [run["seed"] for run in group],
            "steps_reached": [run["last_step"] for run in group],
            "final_sps": [run["sps"] for run in group],
            f"mean_return_last_bin_to_{common_step}": means[-1] if means else float("nan"),
        }

    with open(companion(out, ".csv"), "w") as f:
        names = list(runs)
        f.write(",".join(["step"] + names) + "\n")
        for i, step in enumerate(table["step"]):
            f.write(",".join([str(step)] + [f"{table[n][i]:.2f}" for n in names]) + "\n")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "hardware": args.hardware,
        "env_id": args.env_id,
        "compared_up_to_step": int(common_step),
        "bin_steps": args.bin_steps,
        "runs": summary,
        "cleanrl_reference": "ppo_atari.py at 10M steps: Breakout 414.7 +- 28.1 (3 seeds)",
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)

    plt.figure(figsize=(6, 4))
    for name in runs:
        plt.plot(table["step"], table[name], label=f"{name} ({len(runs[name])} seed(s))")
    plt.xlabel("environment steps")
    plt.ylabel(f"episodic return (raw score, mean per {args.bin_steps // 1000}k steps)")
    plt.title(f"{args.env_id}: {args.comparison}\n{args.hardware}, {result['date']}", fontsize=9)
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(companion(out, ".png"), dpi=120)
    print(json.dumps(result, indent=2))
