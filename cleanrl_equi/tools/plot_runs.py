"""Learning curves and a results table from a folder of TensorBoard runs.

Every directory below the given folder(s) that holds `events.out.tfevents.*` files is one run; its event files
are read together by TensorBoard's EventAccumulator, so a run resumed with `SummaryWriter(purge_step=S)` drops
the earlier events at steps >= S. A resumed run written without `purge_step` is cleaned the same way: an event
whose step is smaller than the step before it supersedes the earlier events at that step and after.

What a run is comes from what it recorded, not from its directory's name (which `--run-name` may set to anything):
`run.json` (the script that made it and its args) and the hyperparameters table logged to TensorBoard. Its env is
the recorded `env_id`, its script the recorded script, its model the `--model` it ran with; only a run that recorded
none of them is read from a name of the form `{env}__{exp_name}__{seed}__{suffix}` ("ALE/Breakout-v5__ppo_atari__1__1").

Runs are grouped into experiments by (env, script, exp_name); runs of one such group that differ in a recorded
setting are different experiments: by default every setting whose value differs among them splits them, except
the seed, the run's name and length, and the flags that do not change what is learned (logging, checkpoints,
devices); `--group-by NAME ...` splits by exactly the names given, `--group-by none` not at all. An experiment is
labelled by its script and model, `sac_equi_bullet (cnn)`, then `exp_name` where it is not the script's name and
the other settings that split it: `sac_equi_bullet/long (cnn) [gamma=0.9]`. The runs of one experiment are its
seeds; runs that share a seed are averaged into that seed first, never counted as independent seeds.

The x axis is the step each script logs at, which does not count the same thing everywhere: environment steps for
the online scripts (PPO, RPO, SAC, DQN), gradient steps for the offline ones (CQL, IQL). Curves of different kinds
never share an axis: each (env, tag, kind of step) gets its own PNG, named `{env}__{tag}.png` for environment steps
and `{env}__{tag}__gradient_steps.png` for gradient steps (`__steps` where the script is not known), and its x axis
says what it counts. No two plots share a file name, and no file is overwritten unless `--overwrite` is given.

In each PNG, one curve per experiment over every step that any of its runs covers: each run is interpolated
linearly onto `--points` steps spread evenly over that range (and onto its own first and last step, so no run is
left out), only inside the steps it logged, and optionally smoothed (`--smooth`); a seed's runs are averaged where
they cover a step, and the mean over the seeds covering a step is drawn with a 95% confidence band for that mean:
the Student-t interval, mean +- t(0.975, n-1) * sd / sqrt(n) over the n seeds there (no band where n = 1). Where
fewer than all the experiment's seeds cover a step the curve is dashed, and the legend gives the range of n.
The table (`summary.md`, `summary.csv`, also printed) has one row per (env, experiment, tag): the number of seeds,
the last value (each seed's final logged value; mean +- the same 95% t half-width), the best value (the mean over
seeds of each seed's maximum) and the steps reached, with what they count.

    uv run python -m cleanrl_equi.tools.plot_runs runs/ --out plots/
    uv run python -m cleanrl_equi.tools.plot_runs runs/ --out plots/ --group-by model --smooth 5 --overwrite
    uv run python -m cleanrl_equi.tools.plot_runs runs/a runs/b --tags charts/episodic_return losses/value_loss
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import tyro

from cleanrl_equi.errors import fail, write_error

DEFAULT_TAGS = ["charts/episodic_return", "eval/success_rate", "eval/discounted_return"]
EVENT_FILE_PREFIX = "events.out.tfevents."
HPARAMS_TAG = "hyperparameters/text_summary"
RUN_FILE = "run.json"  # written by cleanrl_equi.run.Run: {"script": ..., "started": ..., "args": {...}}
NOT_EXPERIMENT_SETTINGS = {  # differ between runs of one experiment without changing what is learned
    "seed", "run_name", "exp_name", "env_id", "total_timesteps", "num_iterations", "checkpoint_minutes",
    "progress_interval", "cuda", "track", "wandb_project_name", "wandb_entity", "save_model", "capture_video",
    "eval_checkpoint", "num_eval_envs", "log_frequency", "async_envs", "torch_deterministic"}
ENV_STEPS, GRADIENT_STEPS, UNKNOWN_STEPS = "env steps", "gradient steps", "steps"
STEP_KINDS = {  # what each script's logged step (its `global_step`) counts
    "ppo_atari": ENV_STEPS, "ppo_atari_equi": ENV_STEPS, "rpo_mujoco": ENV_STEPS, "sac_equi_bullet": ENV_STEPS,
    "dqn_equi_bullet": ENV_STEPS, "cql_equi_offline": GRADIENT_STEPS, "iql_equi_offline": GRADIENT_STEPS}
X_LABELS = {ENV_STEPS: "environment steps", GRADIENT_STEPS: "gradient steps (updates on the dataset)",
            UNKNOWN_STEPS: "logged step (what it counts is not known for this script)"}
FILE_SUFFIXES = {ENV_STEPS: "", GRADIENT_STEPS: "__gradient_steps", UNKNOWN_STEPS: "__steps"}


@dataclass
class Args:
    folders: tyro.conf.Positional[list[str]] = field(default_factory=lambda: ["runs"])
    """folder(s) searched recursively for runs (directories holding `events.out.tfevents.*` files)"""
    out: str = "plots"
    """folder for the PNGs, `summary.md` and `summary.csv` (created if missing)"""
    overwrite: bool = False
    """replace PNGs and tables already in `out`; without it an existing file stops the tool before it writes any"""
    tags: list[str] = field(default_factory=lambda: list(DEFAULT_TAGS))
    """scalar tags to plot and tabulate; tags that no run logged are skipped"""
    group_by: list[str] = field(default_factory=list)
    """setting names whose values split experiments (e.g. `--group-by model`); default: every setting that differs
    between runs of one env, script and exp_name; `none`: do not split"""
    points: int = 100
    """number of evenly spread steps that each run is interpolated onto (each run's first and last step are added)"""
    smooth: int = 1
    """moving-average window in grid points applied to each run's curve (1 = no smoothing)"""
    dpi: int = 120
    """resolution of the PNGs"""


@dataclass
class Run:
    path: str
    env: str
    exp: str
    seed: str
    script: str  # the script that made the run ("" where it recorded none)
    settings: dict  # its recorded args as strings: run.json's, else TensorBoard's hyperparameters table
    scalars: dict  # tag -> (steps, values) as numpy arrays, in logged order, superseded events dropped
    steps_kind: str = UNKNOWN_STEPS
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


def read_run_file(run_dir: str) -> tuple[str, dict[str, str]]:
    """(script, args as strings) from the run's `run.json`; ("", {}) where there is none or it cannot be read."""
    try:
        with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return "", {}
    if not isinstance(record, dict):
        return "", {}
    script = str(record.get("script") or "")
    script = script[: -len(".py")] if script.endswith(".py") else script
    args = record.get("args") if isinstance(record.get("args"), dict) else {}
    return script, {str(name): str(value) for name, value in args.items()}


def parse_run_name(rel_path: str, hparams: dict[str, str]) -> tuple[str, str, str]:
    """(env, exp_name, seed) of a run: the recorded `env_id`, `exp_name` and `seed` where the run recorded them,
    else read from its path relative to the searched folder, `{env}__{exp}__{seed}__{suffix}`, whose folders above
    are part of the env id (the scripts put only the env id's own folders there: "ALE/Breakout-v5__ppo_atari__1__1").
    A directory named otherwise without recorded settings is its parent folder's env, its own name's experiment."""
    rel_path = rel_path.replace(os.sep, "/")
    parent, _, base = rel_path.rpartition("/")
    parts = base.split("__")
    if len(parts) >= 4:
        name_env = f"{parent}/{parts[0]}" if parent else parts[0]
        name_exp, name_seed = "__".join(parts[1:-2]), parts[-2]
    else:
        name_env, name_exp, name_seed = parent or base, base, "?"
    return (hparams.get("env_id") or name_env, hparams.get("exp_name") or name_exp,
            hparams.get("seed") or name_seed)


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
    """Linear interpolation of one run onto `grid`; values logged at the same step are averaged first."""
    order = np.argsort(steps, kind="stable")
    unique, inverse = np.unique(steps[order], return_inverse=True)
    means = np.bincount(inverse, weights=values[order]) / np.bincount(inverse)
    return np.interp(grid, unique, means)


def curve(seeds: list[list[tuple[np.ndarray, np.ndarray]]], points: int, smooth: int):
    """(grid, mean, 95% half-width, seeds covering each grid step) over every step that some run covers. `seeds`
    holds the runs of each seed. Each run counts only inside the steps it logged; the runs of one seed are averaged
    where they cover a step, and the statistics at a step are over the seeds that cover it (a short run neither
    shortens the others nor is left out)."""
    from scipy.special import stdtrit

    runs = [run for seed in seeds for run in seed]
    ends = [float(steps[0]) for steps, _ in runs] + [float(steps[-1]) for steps, _ in runs]
    grid = np.union1d(np.linspace(min(ends), max(ends), points), ends)
    per_seed = np.full((len(seeds), len(grid)), np.nan)
    for i, seed in enumerate(seeds):
        total, covering = np.zeros(len(grid)), np.zeros(len(grid))
        for steps, values in seed:  # steps are non-decreasing after drop_superseded
            inside = (grid >= steps[0]) & (grid <= steps[-1])
            total[inside] += moving_average(interpolate(steps, values, grid[inside]), smooth)
            covering[inside] += 1
        per_seed[i, covering > 0] = total[covering > 0] / covering[covering > 0]
    count = np.isfinite(per_seed).sum(axis=0)
    with warnings.catch_warnings():  # steps covered by one seed have no spread: NaN half-width, as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(per_seed, axis=0)
        sd = np.nanstd(per_seed, axis=0, ddof=1)
        half = np.where(count >= 2, stdtrit(np.maximum(count - 1, 1), 0.975) * sd / np.sqrt(np.maximum(count, 1)),
                        np.nan)
    return grid, mean, half, count


def differing_settings(runs: list[Run], run: Run) -> list[str]:
    """The recorded settings whose values differ among the runs of `run`'s env, script and exp_name (not the seed,
    names, lengths or infrastructure flags): what makes them different experiments."""
    peers = [other for other in runs if (other.env, other.script, other.exp) == (run.env, run.script, run.exp)]
    names = sorted({name for other in peers for name in other.settings} - NOT_EXPERIMENT_SETTINGS)
    return [name for name in names if len({other.settings.get(name) for other in peers}) > 1]


def experiment_label(run: Run, split_by: list[str], models: set) -> str:
    """`script (model)`, then exp_name where it is not the script's name, then the other settings that split the
    experiment: `sac_equi_bullet/long (cnn) [gamma=0.9]`. The model is named where all the experiment's runs share
    one (`models` holds the values among them)."""
    if run.script and run.exp and run.exp != run.script:
        label = f"{run.script}/{run.exp}"
    else:
        label = run.script or run.exp
    if len(models) == 1 and None not in models:
        label += f" ({next(iter(models))})"
    others = [f"{name}={run.settings.get(name, '?')}" for name in split_by if name != "model"]
    return label + (f" [{','.join(others)}]" if others else "")


# ---- Output ----------------------------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def plot_file_names(keys: list[tuple[str, str, str]], out: str) -> dict[tuple[str, str, str], str]:
    """A PNG path for each (env, tag, kind of step), no two alike: `{env}__{tag}{suffix}.png`, with `__2`, `__3`, ...
    where two env ids or tags reduce to the same file name (`a/b` and `a_b`)."""
    names, taken = {}, set()
    for env, tag, kind in keys:
        stem = f"{safe_name(env)}__{safe_name(tag)}{FILE_SUFFIXES[kind]}"
        name, copy = stem, 1
        while name.lower() in taken:  # lower(): a case-insensitive file system would store two names as one file
            copy += 1
            name = f"{stem}__{copy}"
        taken.add(name.lower())
        names[(env, tag, kind)] = os.path.join(out, f"{name}.png")
    return names


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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out!r} is a file; pass a folder for the PNGs and tables.")
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
        script, recorded_args = read_run_file(real)
        settings = {**hparams, **recorded_args}  # run.json holds the args as the script parsed them
        env, exp, seed = parse_run_name(rel, settings)
        steps_kind = STEP_KINDS.get(script) or STEP_KINDS.get(exp) or UNKNOWN_STEPS  # exp_name defaults to the script
        runs.append(Run(real, env, exp, seed, script, settings, scalars, steps_kind))

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
        if not any(name in run.settings for run in runs):
            fail(f"--group-by {name}: no run recorded a setting named {name!r}; "
                 "pick a name from the runs' hyperparameters table.")
    split_by = {id(run): (group_by if args.group_by else differing_settings(runs, run)) for run in runs}
    experiments: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.env, run.script, run.exp, run.steps_kind,
               tuple((name, run.settings.get(name)) for name in split_by[id(run)]))
        experiments.setdefault(key, []).append(run)
    for members in experiments.values():
        models = {run.settings.get("model") for run in members}
        label = experiment_label(members[0], split_by[id(members[0])], models)
        for run in members:
            run.experiment = label

    # Plan every file before writing any, so a refusal to overwrite leaves the folder as it was.
    figures: dict[tuple[str, str, str], dict[str, list[Run]]] = {}
    for run in runs:
        for tag in present:
            if tag in run.scalars:
                figures.setdefault((run.env, tag, run.steps_kind), {}).setdefault(run.experiment, []).append(run)
    kinds = list(FILE_SUFFIXES)
    keys = sorted(figures, key=lambda key: (key[0], present.index(key[1]), kinds.index(key[2])))  # tags as asked
    png_paths = plot_file_names(keys, args.out)
    table_paths = [os.path.join(args.out, "summary.md"), os.path.join(args.out, "summary.csv")]
    existing = [path for path in [*png_paths.values(), *table_paths] if os.path.exists(path)]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more of the files it would write)" if len(existing) > 1 else ""
        fail(f"{existing[0]} already exists{more}; pass --overwrite to replace it, or choose another --out.")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        write_error(args.out, exc)
    rows, written = [], []
    for env, tag, kind in keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for experiment in sorted(figures[(env, tag, kind)]):
            by_seed: dict[str, list] = {}
            for run in sorted(figures[(env, tag, kind)][experiment], key=lambda r: (r.seed, r.path)):
                by_seed.setdefault(run.seed, []).append(run.scalars[tag])
            seeds = list(by_seed.values())
            n, n_runs = len(seeds), sum(len(seed) for seed in seeds)
            last = np.array([np.mean([values[-1] for _, values in seed]) for seed in seeds])
            best = np.array([np.mean([values.max() for _, values in seed]) for seed in seeds])
            reached = [int(steps[-1]) for seed in seeds for steps, _ in seed]
            rows.append({"env": env, "experiment": experiment, "tag": tag, "seeds": n, "runs": n_runs,
                         "last_mean": float(last.mean()), "last_ci95": float(t_halfwidth(last)),
                         "best_mean": float(best.mean()), "best_ci95": float(t_halfwidth(best)),
                         "steps_min": min(reached), "steps_max": max(reached), "steps_count": kind})
            grid, mean, half, count = curve(seeds, args.points, args.smooth)
            full = count == n
            label = f"{experiment}, {n} seed{'s' if n != 1 else ''}"
            if not full.all():
                label += f" ({count[count > 0].min()}–{n} per step; dashed: fewer)"
            marker = "o" if len(grid) == 1 else None
            (line,) = ax.plot(grid, np.where(full, mean, np.nan), label=label, linewidth=1.5, marker=marker)
            if not full.all():
                dashed = ~full
                dashed[1:] |= ~full[:-1]  # one step into the solid part on either side, so the two join
                dashed[:-1] |= ~full[1:]
                ax.plot(grid, np.where(dashed, mean, np.nan), color=line.get_color(), linewidth=1.2,
                        linestyle="--", marker=marker)
            band = np.isfinite(half)
            if band.any():
                ax.fill_between(grid, mean - np.nan_to_num(half), mean + np.nan_to_num(half), where=band,
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"{env}: {tag}")
        ax.set_xlabel(X_LABELS[kind])
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        try:
            fig.savefig(png_paths[(env, tag, kind)], dpi=args.dpi)
        except OSError as exc:
            write_error(png_paths[(env, tag, kind)], exc)
        written.append(png_paths[(env, tag, kind)])
        plt.close(fig)

    header = "| env | experiment | tag | seeds | last (mean ± 95% CI) | best (mean of seed max) | steps reached |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        last = fmt(row["last_mean"]) + (f" ± {fmt(row['last_ci95'])}" if row["seeds"] > 1 else "")
        lo, hi = row["steps_min"], row["steps_max"]
        steps = (str(lo) if lo == hi else f"{lo}–{hi}") + f" {row['steps_count']}"
        seeds = str(row["seeds"]) if row["runs"] == row["seeds"] else f"{row['seeds']} ({row['runs']} runs)"
        lines.append(f"| {md_cell(row['env'])} | {md_cell(row['experiment'])} | {md_cell(row['tag'])} | {seeds} "
                     f"| {last} | {fmt(row['best_mean'])} | {steps} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    try:
        with open(table_paths[0], "w", encoding="utf-8") as f:
            f.write(table)
        with open(table_paths[1], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as exc:
        write_error(args.out, exc)
    assert len(set(written)) == len(written), "two plots were given one file name"
    print(f"wrote {len(written)} plot(s), summary.md and summary.csv to {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
