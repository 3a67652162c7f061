"""Learning curves and a results table from a folder of TensorBoard runs.

Every directory below the given folder(s) that holds `events.out.tfevents.*` files is one run; its event files
are read together by TensorBoard's EventAccumulator, so a run resumed with `SummaryWriter(purge_step=S)` drops
the earlier events at steps >= S. A resumed run written without `purge_step` is cleaned the same way: an event
whose step is smaller than the step before it supersedes the earlier events at that step and after.

Runs are grouped into experiments by (env, exp_name), read from the run directory's path relative to the folder,
`{env}__{exp_name}__{seed}__{suffix}` ("ALE/Breakout-v5__ppo_atari__1__123" is env "ALE/Breakout-v5"); the
`env_id` in a run's logged hyperparameters settles which parent folders belong to the env id. Runs of one
(env, exp_name) that differ in a logged hyperparameter are different experiments: by default every hyperparameter
whose value differs among them splits them (`sac_equi_bullet[model=cnn]`), except the seed, the run's name and
length, and the flags that do not change what is learned (logging, checkpoints, devices); `--group-by NAME ...`
splits by exactly the names given, `--group-by none` not at all. The runs of one experiment are its seeds; runs
that share a seed are averaged into that seed first, never counted as independent seeds.

For each env and tag, one PNG with one curve per experiment: each seed is interpolated linearly onto `--points`
steps spread evenly over the range all its seeds have logged, optionally smoothed (`--smooth`), and the mean over
seeds is drawn with a 95% confidence band for that mean: the Student-t interval, mean +- t(0.975, n-1) * sd /
sqrt(n) over the n seeds (no band with one seed). The table (`summary.md`, `summary.csv`, also printed) has one row
per (env, experiment, tag): the number of seeds, the last value (each seed's final logged value; mean +- the same
95% t half-width), the best value (the mean over seeds of each seed's maximum) and the steps reached.

    uv run python -m cleanrl_equi.tools.plot_runs runs/ --out plots/
    uv run python -m cleanrl_equi.tools.plot_runs runs/ --out plots/ --group-by model --smooth 5
    uv run python -m cleanrl_equi.tools.plot_runs runs/a runs/b --tags charts/episodic_return losses/value_loss
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import tyro

from cleanrl_equi.errors import fail

DEFAULT_TAGS = ["charts/episodic_return", "eval/success_rate", "eval/discounted_return"]
EVENT_FILE_PREFIX = "events.out.tfevents."
HPARAMS_TAG = "hyperparameters/text_summary"
NOT_EXPERIMENT_SETTINGS = {  # differ between runs of one experiment without changing what is learned
    "seed", "run_name", "exp_name", "env_id", "total_timesteps", "num_iterations", "checkpoint_minutes",
    "progress_interval", "cuda", "track", "wandb_project_name", "wandb_entity", "save_model", "capture_video",
    "eval_checkpoint", "num_eval_envs", "log_frequency", "async_envs", "torch_deterministic"}


@dataclass
class Args:
    folders: tyro.conf.Positional[list[str]] = field(default_factory=lambda: ["runs"])
    """folder(s) searched recursively for runs (directories holding `events.out.tfevents.*` files)"""
    out: str = "plots"
    """folder for the PNGs, `summary.md` and `summary.csv` (created if missing)"""
    tags: list[str] = field(default_factory=lambda: list(DEFAULT_TAGS))
    """scalar tags to plot and tabulate; tags that no run logged are skipped"""
    group_by: list[str] = field(default_factory=list)
    """hyperparameter names whose values split experiments (e.g. `--group-by model`); default: every hyperparameter
    that differs between runs of one env and exp_name; `none`: do not split"""
    points: int = 100
    """number of steps of the common grid that each seed is interpolated onto"""
    smooth: int = 1
    """moving-average window in grid points applied to each seed's curve (1 = no smoothing)"""
    dpi: int = 120
    """resolution of the PNGs"""


@dataclass
class Run:
    path: str
    env: str
    exp: str
    seed: str
    hparams: dict
    scalars: dict  # tag -> (steps, values) as numpy arrays, in logged order, superseded events dropped
    experiment: str = ""


# ---- Finding and reading runs ----------------------------------------------------------------------------------------
def find_run_dirs(root: str) -> list[str]:
    """Directories below `root` (or `root` itself) holding event files. The subfolders of a run are not runs of
    their own (SummaryWriter.add_scalars writes there), so the search does not go into them."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if any(name.startswith(EVENT_FILE_PREFIX) for name in filenames):
            found.append(dirpath)
            dirnames[:] = []
        else:
            dirnames.sort()
    return sorted(found)


def drop_superseded(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Events in logged order, less those superseded by a restart: an event whose step is smaller than the
    previous one (a run resumed from an earlier checkpoint) replaces every earlier event at its step or later."""
    kept_steps: list[int] = []
    kept_values: list[float] = []
    for step, value in zip(steps, values):
        if kept_steps and step < kept_steps[-1]:
            keep = int(np.searchsorted(np.asarray(kept_steps), step, side="left"))
            del kept_steps[keep:], kept_values[keep:]
        kept_steps.append(step)
        kept_values.append(value)
    return np.asarray(kept_steps, dtype=np.int64), np.asarray(kept_values, dtype=np.float64)


def parse_hparams(text: str) -> dict[str, str]:
    """The `|param|value|` markdown table that the scripts log as "hyperparameters", as {name: value}."""
    table = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = line.strip("|").split("|", 1)
        if len(cells) != 2:
            continue
        name, value = cells[0].strip(), cells[1].strip()
        if name in ("param", "") or set(name) <= set("-: "):
            continue
        table[name] = value
    return table


def read_run(run_dir: str, tags: list[str]) -> tuple[dict, dict, list[str]]:
    """(scalars for `tags`, hyperparameters, every scalar tag logged) of one run, all its event files together."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    available = accumulator.Tags()
    scalars = {}
    for tag in tags:
        if tag in available.get("scalars", []):
            events = accumulator.Scalars(tag)
            steps, values = drop_superseded([e.step for e in events], [e.value for e in events])
            if len(steps):
                scalars[tag] = (steps, values)
    hparams = {}
    if HPARAMS_TAG in available.get("tensors", []):
        proto = accumulator.Tensors(HPARAMS_TAG)[-1].tensor_proto
        if proto.string_val:
            hparams = parse_hparams(proto.string_val[0].decode("utf-8", errors="replace"))
    return scalars, hparams, list(available.get("scalars", []))


def parse_run_name(rel_path: str, hparams: dict[str, str]) -> tuple[str, str, str]:
    """(env, exp_name, seed) of a run from its path relative to the searched folder.

    `{env}__{exp}__{seed}__{suffix}` is split on "__"; the folders above it are part of the env id when the
    logged `env_id` says so ("ALE/Breakout-v5"), or, without logged hyperparameters, always (the scripts put only
    the env id's own folders there). A directory named otherwise takes env_id / exp_name / seed from the
    hyperparameters, else its parent folder and its own name."""
    rel_path = rel_path.replace(os.sep, "/")
    parent, _, base = rel_path.rpartition("/")
    env_id = hparams.get("env_id")
    parts = base.split("__")
    if len(parts) < 4:
        return env_id or parent or base, hparams.get("exp_name", base), hparams.get("seed", "?")
    name_env, exp, seed = parts[0], "__".join(parts[1:-2]), parts[-2]
    if env_id and (env_id == name_env or env_id.replace("/", "_") == name_env):
        env = name_env  # the folders above are only where the runs were put
    elif env_id and env_id.endswith("/" + name_env):
        env = env_id
    elif parent:
        env = f"{parent}/{name_env}"
    else:
        env = name_env
    return env, exp, seed


# ---- Statistics ------------------------------------------------------------------------------------------------------
def t_halfwidth(samples: np.ndarray, axis: int = 0) -> np.ndarray | float:
    """Half-width of the 95% Student-t confidence interval of the mean of `samples` along `axis` (NaN for n < 2)."""
    from scipy.special import stdtrit  # the Student-t quantile function (scipy.stats takes seconds to import)

    n = samples.shape[axis]
    if n < 2:
        return np.full(np.delete(samples.shape, axis), np.nan) if samples.ndim > 1 else float("nan")
    return stdtrit(n - 1, 0.975) * np.std(samples, axis=axis, ddof=1) / math.sqrt(n)


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (fewer at the start)."""
    if window <= 1:
        return y
    cumulative = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(1, len(y) + 1)
    start = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def interpolate(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of one seed onto `grid`; values logged at the same step are averaged first."""
    order = np.argsort(steps, kind="stable")
    unique, inverse = np.unique(steps[order], return_inverse=True)
    means = np.bincount(inverse, weights=values[order]) / np.bincount(inverse)
    return np.interp(grid, unique, means)


def curve(seeds: list[list[tuple[np.ndarray, np.ndarray]]], points: int, smooth: int):
    """(grid, mean, 95% half-width) over the steps that every run covers, or None if they share none. `seeds` holds
    the runs of each seed; runs of one seed are averaged into one curve before the statistics over seeds."""
    runs = [run for seed in seeds for run in seed]
    lo = max(int(steps[0]) for steps, _ in runs)  # steps are non-decreasing after drop_superseded
    hi = min(int(steps[-1]) for steps, _ in runs)
    if lo > hi:
        return None
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([float(lo)])
    per_seed = np.stack([np.mean([moving_average(interpolate(s, v, grid), smooth) for s, v in seed], axis=0)
                         for seed in seeds])
    return grid, per_seed.mean(axis=0), t_halfwidth(per_seed, axis=0)


def differing_settings(runs: list[Run], run: Run) -> list[str]:
    """The logged hyperparameters whose values differ among the runs of `run`'s env and exp_name (not the seed,
    names, lengths or infrastructure flags): what makes them different experiments."""
    peers = [other for other in runs if other.env == run.env and other.exp == run.exp]
    names = sorted({name for other in peers for name in other.hparams} - NOT_EXPERIMENT_SETTINGS)
    return [name for name in names if len({other.hparams.get(name) for other in peers}) > 1]


# ---- Output ----------------------------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def main(args: Args) -> None:
    if args.points < 2:
        fail(f"--points {args.points} is too small; the common grid needs at least 2 points.")
    if args.smooth < 1:
        fail(f"--smooth {args.smooth} is not a window; pass 1 (no smoothing) or more grid points.")
    if not args.tags:
        fail("--tags is empty; name at least one scalar tag such as charts/episodic_return.")
    if not args.folders:
        fail("no folder given; pass the folder that holds the runs, e.g. runs/.")
    for folder in args.folders:
        if not os.path.isdir(folder):
            fail(f"folder {folder!r} does not exist; pass the folder that holds the runs, e.g. runs/.")
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # truncated last records etc. are not our errors

    run_paths: dict[str, str] = {}  # realpath -> path relative to its search folder
    for folder in args.folders:
        for run_dir in find_run_dirs(folder):
            rel = os.path.relpath(run_dir, folder)
            if rel == ".":
                rel = os.path.basename(os.path.abspath(folder))
            run_paths.setdefault(os.path.realpath(run_dir), rel)
    if not run_paths:
        fail(f"no runs (directories with {EVENT_FILE_PREFIX}* files) found under {', '.join(args.folders)}.")

    runs: list[Run] = []
    logged_tags: set[str] = set()
    for real, rel in sorted(run_paths.items(), key=lambda item: item[1]):
        try:
            scalars, hparams, run_tags = read_run(real, args.tags)
        except Exception as exc:  # noqa: BLE001 -- a damaged event file should not stop the other runs from being plotted
            print(f"note: skipped {rel} ({type(exc).__name__}: {exc})")
            continue
        logged_tags.update(run_tags)
        env, exp, seed = parse_run_name(rel, hparams)
        runs.append(Run(real, env, exp, seed, hparams, scalars))

    present = [tag for tag in args.tags if any(tag in run.scalars for run in runs)]
    if not present:
        found = sorted(logged_tags)
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "none"
        fail(f"none of the tags {', '.join(args.tags)} was logged by the {len(run_paths)} run(s) found "
             f"(scalar tags there: {shown}); pick tags with --tags.")
    missing = [tag for tag in args.tags if tag not in present]
    if missing and args.tags != DEFAULT_TAGS:
        print(f"note: no run logged {', '.join(missing)}; skipped")

    group_by = [] if args.group_by == ["none"] else args.group_by
    for name in group_by:
        if not any(name in run.hparams for run in runs):
            fail(f"--group-by {name}: no run logged a hyperparameter named {name!r}; "
                 "pick a name from the runs' hyperparameters table.")
    for run in runs:
        names = group_by if args.group_by else differing_settings(runs, run)
        labels = [f"{name}={run.hparams.get(name, '?')}" for name in names]
        run.experiment = f"{run.exp}[{','.join(labels)}]" if labels else run.exp

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    rows, written = [], []
    for env in sorted({run.env for run in runs}):
        env_runs = [run for run in runs if run.env == env]
        for tag in present:
            experiments: dict[str, list[Run]] = {}
            for run in env_runs:
                if tag in run.scalars:
                    experiments.setdefault(run.experiment, []).append(run)
            if not experiments:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = 0
            for experiment in sorted(experiments):
                by_seed: dict[str, list] = {}
                for run in sorted(experiments[experiment], key=lambda r: r.seed):
                    by_seed.setdefault(run.seed, []).append(run.scalars[tag])
                seeds = list(by_seed.values())
                n, n_runs = len(seeds), sum(len(seed) for seed in seeds)
                last = np.array([np.mean([values[-1] for _, values in seed]) for seed in seeds])
                best = np.array([np.mean([values.max() for _, values in seed]) for seed in seeds])
                reached = [int(steps[-1]) for seed in seeds for steps, _ in seed]
                rows.append({"env": env, "experiment": experiment, "tag": tag, "seeds": n, "runs": n_runs,
                             "last_mean": float(last.mean()), "last_ci95": float(t_halfwidth(last)),
                             "best_mean": float(best.mean()), "best_ci95": float(t_halfwidth(best)),
                             "steps_min": min(reached), "steps_max": max(reached)})
                result = curve(seeds, args.points, args.smooth)
                if result is None:
                    print(f"note: {env} {experiment} {tag}: its seeds share no logged step range; curve left out")
                    continue
                grid, mean, half = result
                label = f"{experiment} ({n} seed{'s' if n != 1 else ''})"
                (line,) = ax.plot(grid, mean, label=label, marker="o" if len(grid) == 1 else None, linewidth=1.5)
                if n > 1:
                    ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
                drawn += 1
            if drawn:
                ax.set_title(f"{env}: {tag}")
                ax.set_xlabel("global step")
                ax.set_ylabel(tag)
                ax.grid(alpha=0.3)
                ax.legend(fontsize="small")
                fig.tight_layout()
                path = os.path.join(args.out, f"{safe_name(env)}__{safe_name(tag)}.png")
                fig.savefig(path, dpi=args.dpi)
                written.append(path)
            plt.close(fig)

    header = "| env | experiment | tag | seeds | last (mean ± 95% CI) | best (mean of seed max) | steps |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        last = fmt(row["last_mean"]) + (f" ± {fmt(row['last_ci95'])}" if row["seeds"] > 1 else "")
        lo, hi = row["steps_min"], row["steps_max"]
        steps = str(lo) if lo == hi else f"{lo}–{hi}"
        seeds = str(row["seeds"]) if row["runs"] == row["seeds"] else f"{row['seeds']} ({row['runs']} runs)"
        lines.append(f"| {md_cell(row['env'])} | {md_cell(row['experiment'])} | {md_cell(row['tag'])} | {seeds} "
                     f"| {last} | {fmt(row['best_mean'])} | {steps} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.out, "summary.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(written)} plot(s), summary.md and summary.csv to {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
