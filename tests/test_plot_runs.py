"""cleanrl_equi.tools.plot_runs on synthetic TensorBoard runs whose curves, last and best values are known by hand.

The runs are written as the scripts write them: the hyperparameters table in the event file and, for runs made
through cleanrl_equi.run.Run, `run.json` with the script and its args beside it.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.tools import plot_runs as tool
from cleanrl_equi.tools.plot_runs import drop_superseded, parse_run_name
from conftest import REPO, script_fails_with
BLOCK = "cleanrl_equi/BlockPulling-v0"
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}  # Student-t 0.975 quantiles by degrees of freedom


def write_run(run_dir, hparams, points, purge_step=None, script=None):
    """One event file in `run_dir`: the hyperparameters table as the scripts log it, then (tag, step, value)s; with
    `script`, also the `run.json` that cleanrl_equi.run.Run writes (the script's name and its args)."""
    if script is not None:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "run.json"), "w") as f:
            json.dump({"script": script, "started": "2025-01-01 00:00:00", "args": hparams}, f)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))
    for tag, step, value in points:
        writer.add_scalar(tag, value, step)
    writer.close()


def ppo_value(seed, k):
    """ppo_atari: 10*seed + k at step 100*k, with a peak of 50 + seed at k = 5 (so best != last)."""
    return 50.0 + seed if k == 5 else 10.0 * seed + k


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """ALE/Pong-v5: ppo_atari (model cnn) and ppo_atari_equi (model equi), 3 seeds each, seed 3 of ppo_atari_equi
    resumed with purge_step; cleanrl_equi/BlockPulling-v0: sac_equi_bullet with 4 seeds, model equi (seeds 1, 2)
    and cnn (seeds 3, 4). Each run has its run.json, except ppo_atari's (runs made before run.json existed)."""
    root = tmp_path_factory.mktemp("runs")
    ret = "charts/episodic_return"
    for seed in (1, 2, 3):
        # the seeds log at different steps: 100*k + 10*(seed-1), so the last steps are 1000, 1010, 1020
        write_run(str(root / "ALE" / f"Pong-v5__ppo_atari__{seed}__100{seed}"),
                  {"exp_name": "ppo_atari", "seed": seed, "env_id": "ALE/Pong-v5", "model": "cnn"},
                  [(ret, 100 * k + 10 * (seed - 1), ppo_value(seed, k)) for k in range(11)])
    for seed in (1, 2):  # 2k + seed: last = best = 20 + seed
        write_run(str(root / "ALE" / f"Pong-v5__ppo_atari_equi__{seed}__200{seed}"),
                  {"exp_name": "ppo_atari_equi", "seed": seed, "env_id": "ALE/Pong-v5", "model": "equi"},
                  [(ret, 100 * k, 2.0 * k + seed) for k in range(11)], script="ppo_atari_equi")
    # Seed 3 is interrupted and resumed from step 600: the first file's events at steps >= 600 (with a peak of 500
    # at step 800) are superseded by the second file's 2k + 4, so last = best = 24.
    resumed = str(root / "ALE" / "Pong-v5__ppo_atari_equi__3__2003")
    hparams = {"exp_name": "ppo_atari_equi", "seed": 3, "env_id": "ALE/Pong-v5", "model": "equi"}
    write_run(resumed, hparams, [(ret, 100 * k, 500.0 if k == 8 else 2.0 * k + 3) for k in range(11)],
              script="ppo_atari_equi")
    time.sleep(1.05)  # event file names start with the unix time: the resumed part sorts after the first part
    write_run(resumed, hparams, [(ret, 100 * k, 2.0 * k + 4) for k in range(6, 11)], purge_step=600)
    assert len([name for name in os.listdir(resumed) if name.startswith("events.out.tfevents.")]) == 2
    for seed in (1, 2, 3, 4):  # success rate k * seed / 100: last = best = seed / 10
        write_run(str(root / f"cleanrl_equi_BlockPulling-v0__sac_equi_bullet__{seed}__300{seed}"),
                  {"exp_name": "sac_equi_bullet", "seed": seed, "env_id": "cleanrl_equi/BlockPulling-v0",
                   "model": "equi" if seed <= 2 else "cnn"},
                  [("eval/success_rate", 100 * k, k * seed / 100) for k in range(11)], script="sac_equi_bullet")
    return str(root)


def plot_runs(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "cleanrl_equi.tools.plot_runs", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"plot_runs exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_summary(out):
    """(markdown rows as {(env, experiment, tag): cells}, csv rows as {(env, experiment, tag): row})."""
    with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("| env | experiment | tag | seeds |")
    md = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        md[tuple(cells[:3])] = cells[3:]
    with open(os.path.join(out, "summary.csv"), newline="", encoding="utf-8") as f:
        table = {(r["env"], r["experiment"], r["tag"]): r for r in csv.DictReader(f)}
    assert set(md) == set(table)
    return md, table


def half_width(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return T_975[n - 1] * sd / math.sqrt(n)


def test_plots_and_summary(runs_root, tmp_path):
    out = str(tmp_path / "plots")
    proc = plot_runs(runs_root, "--out", out)
    assert proc.stdout.startswith("| env | experiment | tag |")  # the table is printed too

    import matplotlib.image

    pngs = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert pngs == ["ALE_Pong-v5__charts_episodic_return.png", "cleanrl_equi_BlockPulling-v0__eval_success_rate.png"]
    for name in pngs:
        image = matplotlib.image.imread(os.path.join(out, name))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.shape[2] in (3, 4)

    md, table = read_summary(out)
    ret = "charts/episodic_return"
    # sac's runs differ in --model: two experiments without being told (each PPO script's runs agree); every
    # experiment is labelled with its script and model
    assert set(md) == {("ALE/Pong-v5", "ppo_atari (cnn)", ret), ("ALE/Pong-v5", "ppo_atari_equi (equi)", ret),
                       (BLOCK, "sac_equi_bullet (cnn)", "eval/success_rate"),
                       (BLOCK, "sac_equi_bullet (equi)", "eval/success_rate")}  # absent tags left out

    ppo_last = [10.0 * s + 10 for s in (1, 2, 3)]  # 20, 30, 40
    ppo_best = [max(ppo_value(s, k) for k in range(11)) for s in (1, 2, 3)]  # 51, 52, 53
    row = table[("ALE/Pong-v5", "ppo_atari (cnn)", ret)]
    assert int(row["seeds"]) == 3
    assert float(row["last_mean"]) == pytest.approx(30.0)
    assert float(row["last_ci95"]) == pytest.approx(half_width(ppo_last), rel=1e-6)
    assert float(row["best_mean"]) == pytest.approx(sum(ppo_best) / 3) == 52.0
    assert float(row["best_ci95"]) == pytest.approx(half_width(ppo_best), rel=1e-6)
    assert (int(row["steps_min"]), int(row["steps_max"])) == (1000, 1020)
    assert md[("ALE/Pong-v5", "ppo_atari (cnn)", ret)] == ["3", "30 ± 24.8", "52", "1000–1020 env steps"]
    assert row["steps_count"] == "env steps"

    # the resumed seed counts once, with its superseded events (the 500 peak, 2k + 3 from step 600) dropped
    equi = [21.0, 22.0, 24.0]
    row = table[("ALE/Pong-v5", "ppo_atari_equi (equi)", ret)]
    assert int(row["seeds"]) == 3
    assert float(row["last_mean"]) == pytest.approx(sum(equi) / 3)
    assert float(row["last_ci95"]) == pytest.approx(half_width(equi), rel=1e-6)
    assert float(row["best_mean"]) == pytest.approx(sum(equi) / 3)
    assert md[("ALE/Pong-v5", "ppo_atari_equi (equi)", ret)] == ["3", "22.3 ± 3.79", "22.3", "1000 env steps"]

    row = table[(BLOCK, "sac_equi_bullet (equi)", "eval/success_rate")]
    assert int(row["seeds"]) == 2 and float(row["last_mean"]) == pytest.approx(0.15)  # seeds 1, 2
    row = table[(BLOCK, "sac_equi_bullet (cnn)", "eval/success_rate")]
    assert int(row["seeds"]) == 2 and float(row["best_mean"]) == pytest.approx(0.35)  # seeds 3, 4


def test_group_by_hyperparameter(runs_root, tmp_path):
    out = str(tmp_path / "plots")
    plot_runs(runs_root, "--out", out, "--group-by", "model", "--points", "20", "--smooth", "3")
    md, table = read_summary(out)
    sr = "eval/success_rate"
    assert {key[1] for key in table} == {"ppo_atari (cnn)", "ppo_atari_equi (equi)", "sac_equi_bullet (cnn)",
                                         "sac_equi_bullet (equi)"}
    equi = table[(BLOCK, "sac_equi_bullet (equi)", sr)]
    cnn = table[(BLOCK, "sac_equi_bullet (cnn)", sr)]
    assert (int(equi["seeds"]), int(cnn["seeds"])) == (2, 2)
    assert float(equi["last_mean"]) == pytest.approx(0.15)  # seeds 1, 2
    assert float(cnn["last_mean"]) == pytest.approx(0.35)  # seeds 3, 4
    assert float(cnn["last_ci95"]) == pytest.approx(half_width([0.3, 0.4]), rel=1e-6)
    assert md[(BLOCK, "sac_equi_bullet (cnn)", sr)] == ["2", "0.35 ± 0.635", "0.35", "1000 env steps"]
    assert os.path.isfile(os.path.join(out, "cleanrl_equi_BlockPulling-v0__eval_success_rate.png"))


def test_group_by_none_and_repeated_seeds(runs_root, tmp_path):
    """`--group-by none` keeps sac's models together (so the label names no model); runs that share a seed are one
    seed (averaged), not two."""
    out = str(tmp_path / "plots")
    plot_runs(runs_root, "--out", out, "--group-by", "none")
    row = read_summary(out)[1][(BLOCK, "sac_equi_bullet", "eval/success_rate")]
    assert (int(row["seeds"]), float(row["last_mean"])) == (4, pytest.approx(0.25))

    root = tmp_path / "repeated"
    for run, (seed, final) in enumerate([(1, 0.2), (1, 0.4), (2, 0.6)]):  # seed 1 run twice
        write_run(str(root / f"cleanrl_equi_BlockPulling-v0__sac__{seed}__{run}"),
                  {"exp_name": "sac", "seed": seed, "env_id": "cleanrl_equi/BlockPulling-v0", "model": "equi"},
                  [("eval/success_rate", 100 * k, final * k / 10) for k in range(11)])
    plot_runs(str(root), "--out", out, "--overwrite")  # runs without run.json: an exp_name that is no script's
    md, table = read_summary(out)
    row = table[(BLOCK, "sac (equi)", "eval/success_rate")]
    assert (int(row["seeds"]), int(row["runs"])) == (2, 3)
    assert float(row["last_mean"]) == pytest.approx((0.3 + 0.6) / 2)  # seed 1's two runs averaged first
    assert float(row["last_ci95"]) == pytest.approx(half_width([0.3, 0.6]), rel=1e-6)
    assert md[(BLOCK, "sac (equi)", "eval/success_rate")][0] == "2 (3 runs)"
    assert md[(BLOCK, "sac (equi)", "eval/success_rate")][3] == "1000 steps"  # what its steps count is not known


@pytest.mark.parametrize("case", ["missing folder", "no runs", "no tags", "unknown group-by"])
def test_errors(case, runs_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run")
    args = {
        "missing folder": [str(tmp_path / "nowhere")],
        "no runs": [str(empty)],
        "no tags": [runs_root, "--tags", "losses/nothing"],
        "unknown group-by": [runs_root, "--group-by", "no_such_flag"],
    }[case]
    proc = plot_runs(*args, "--out", str(tmp_path / "plots"), check=False)
    script_fails_with(proc)
    assert not os.path.exists(tmp_path / "plots")


# ---- What a user reported on a fresh clone ---------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """What each PNG shows, recorded as the tool saves it: {file name: {"xlabel": ..., "curves": {legend label:
    (x, y) of the finite points of every line drawn in that curve's colour}}}."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figures, save = {}, Figure.savefig

    def record(figure, path, *args, **kwargs):
        ax = figure.axes[0]
        lines = ax.get_lines()
        curves = {}
        for line in lines:
            if line.get_label().startswith("_"):
                continue
            same = [other for other in lines if other.get_color() == line.get_color()]
            x = np.concatenate([np.asarray(other.get_xdata(), float) for other in same])
            y = np.concatenate([np.asarray(other.get_ydata(), float) for other in same])
            curves[line.get_label()] = (x[np.isfinite(y)], y[np.isfinite(y)])
        figures[os.path.basename(path)] = {"xlabel": ax.get_xlabel(), "curves": curves}
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def block_run(root, name, script, seed, model, steps, value):
    """A run of `script` on BlockPulling named `name` (the default name or one given with --run-name)."""
    args = {"exp_name": script, "seed": seed, "env_id": BLOCK, "model": model, "run_name": None, "gamma": 0.99}
    write_run(str(root / name), args, [("eval/success_rate", step, value) for step in steps], script=script)


def wrote_count(stdout):
    return int(re.search(r"wrote (\d+) plot\(s\)", stdout).group(1))


@pytest.fixture
def mixed_names(tmp_path):
    """BlockPulling runs of SAC and DQN (x = env steps) and CQL (x = gradient steps), some under the default name
    `cleanrl_equi_BlockPulling-v0__{script}__{seed}__{time}`, some under a name given with --run-name; one SAC run
    with --model cnn."""
    root = tmp_path / "runs"
    online, offline = range(0, 2001, 250), range(0, 50001, 5000)
    block_run(root, "cleanrl_equi_BlockPulling-v0__sac_equi_bullet__1__1700000001", "sac_equi_bullet", 1, "equi",
              online, 0.5)
    block_run(root, "sac_seed2", "sac_equi_bullet", 2, "equi", online, 0.7)
    block_run(root, "sac_cnn", "sac_equi_bullet", 1, "cnn", online, 0.2)
    block_run(root, "cleanrl_equi_BlockPulling-v0__dqn_equi_bullet__1__1700000002", "dqn_equi_bullet", 1, "equi",
              online, 0.4)
    block_run(root, "cleanrl_equi_BlockPulling-v0__cql_equi_offline__1__1700000003", "cql_equi_offline", 1, "equi",
              offline, 0.9)
    block_run(root, "cql_seed2", "cql_equi_offline", 2, "equi", offline, 0.8)
    return str(root)


def test_one_env_one_name_and_every_run_drawn(mixed_names, tmp_path, drawn, capsys):
    """Issues 1, 3 and 4: default-named and --run-name runs of one env are one env; env-step and gradient-step
    curves never share an axis, and each axis says what it counts; runs are labelled by script and model; the count
    printed is the number of PNGs written."""
    out = str(tmp_path / "plots")
    proc = plot_runs(mixed_names, "--out", out, "--tags", "eval/success_rate")
    pngs = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert pngs == ["cleanrl_equi_BlockPulling-v0__eval_success_rate.png",
                    "cleanrl_equi_BlockPulling-v0__eval_success_rate__gradient_steps.png"]
    assert wrote_count(proc.stdout) == len(pngs)
    md, table = read_summary(out)
    assert set(md) == {(BLOCK, "sac_equi_bullet (equi)", "eval/success_rate"),
                       (BLOCK, "sac_equi_bullet (cnn)", "eval/success_rate"),
                       (BLOCK, "dqn_equi_bullet (equi)", "eval/success_rate"),
                       (BLOCK, "cql_equi_offline (equi)", "eval/success_rate")}
    assert md[(BLOCK, "sac_equi_bullet (equi)", "eval/success_rate")] == ["2", "0.6 ± 1.27", "0.6", "2000 env steps"]
    assert md[(BLOCK, "cql_equi_offline (equi)", "eval/success_rate")][3] == "50000 gradient steps"

    tool.main(tool.Args(folders=[mixed_names], out=str(tmp_path / "again"), tags=["eval/success_rate"]))
    assert wrote_count(capsys.readouterr().out) == 2
    online = drawn["cleanrl_equi_BlockPulling-v0__eval_success_rate.png"]
    offline = drawn["cleanrl_equi_BlockPulling-v0__eval_success_rate__gradient_steps.png"]
    assert online["xlabel"] == "environment steps"
    assert offline["xlabel"].startswith("gradient steps")
    assert sorted(online["curves"]) == ["dqn_equi_bullet (equi), 1 seed", "sac_equi_bullet (cnn), 1 seed",
                                        "sac_equi_bullet (equi), 2 seeds"]
    assert sorted(offline["curves"]) == ["cql_equi_offline (equi), 2 seeds"]
    x, y = online["curves"]["sac_equi_bullet (equi), 2 seeds"]
    assert (x.min(), x.max()) == (0, 2000) and np.allclose(y, 0.6)
    x, y = offline["curves"]["cql_equi_offline (equi), 2 seeds"]
    assert (x.min(), x.max()) == (0, 50000) and np.allclose(y, 0.85)


def test_short_runs_do_not_shrink_the_curve(tmp_path, drawn):
    """Issue 2: seeds 1-3 run to step 22440; seed 4 ran three short runs of steps 935-968 (and seed 1 one too).
    The curve covers 0-22440, averaging the seeds that cover each step, and its legend says how many that is."""
    root = tmp_path / "runs"
    long_steps, short_steps = range(0, 22441, 440), [935, 946, 957, 968]
    for seed in (1, 2, 3):
        block_run(root, f"long{seed}", "sac_equi_bullet", seed, "equi", long_steps, float(seed))
    for attempt, value in enumerate([8.0, 10.0, 12.0]):  # seed 4's runs average to 10
        block_run(root, f"short4_{attempt}", "sac_equi_bullet", 4, "equi", short_steps, value)
    block_run(root, "short1", "sac_equi_bullet", 1, "equi", short_steps, 1.0)
    out = str(tmp_path / "plots")
    tool.main(tool.Args(folders=[str(root)], out=out, tags=["eval/success_rate"]))
    (figure,) = drawn.values()
    (label,) = figure["curves"]
    assert label == "sac_equi_bullet (equi), 4 seeds (3–4 per step; dashed: fewer)"
    x, y = figure["curves"][label]
    assert (x.min(), x.max()) == (0, 22440)
    assert np.allclose(y[x == 22440], 2.0)  # seeds 1-3
    assert np.allclose(y[x == 935], (1 + 2 + 3 + 10) / 4)  # seed 4 joins where it ran
    md, _ = read_summary(out)
    assert md[(BLOCK, "sac_equi_bullet (equi)", "eval/success_rate")][0] == "4 (7 runs)"
    assert md[(BLOCK, "sac_equi_bullet (equi)", "eval/success_rate")][3] == "968–22440 env steps"


def test_nothing_is_overwritten_without_the_flag(mixed_names, tmp_path):
    """Issue 5: a second run into the same folder stops with one sentence naming a file and --overwrite, and leaves
    every file as it was; with --overwrite it replaces them."""
    out = str(tmp_path / "plots")
    plot_runs(mixed_names, "--out", out, "--tags", "eval/success_rate")
    before = {name: (os.path.getmtime(os.path.join(out, name)), open(os.path.join(out, name), "rb").read())
              for name in os.listdir(out)}
    assert len(before) == 4  # two PNGs, summary.md, summary.csv
    proc = plot_runs(mixed_names, "--out", out, "--tags", "eval/success_rate", check=False)
    sentence = script_fails_with(proc, "already exists", "--overwrite")
    assert any(os.path.join(out, name) in sentence for name in before), sentence
    after = {name: (os.path.getmtime(os.path.join(out, name)), open(os.path.join(out, name), "rb").read())
             for name in os.listdir(out)}
    assert after == before
    proc = plot_runs(mixed_names, "--out", out, "--tags", "eval/success_rate", "--overwrite")
    assert wrote_count(proc.stdout) == 2
    assert all(os.path.getmtime(os.path.join(out, name)) >= before[name][0] for name in before)


def test_plot_file_names_never_collide():
    """Two env ids that reduce to one file name (and names that differ only in case) get files of their own."""
    keys = [("a/b-v0", "eval/x", tool.ENV_STEPS), ("a_b-v0", "eval/x", tool.ENV_STEPS),
            ("A_b-v0", "eval/x", tool.ENV_STEPS), ("a/b-v0", "eval/x", tool.GRADIENT_STEPS)]
    names = tool.plot_file_names(keys, "out")
    assert len({path.lower() for path in names.values()}) == len(keys)
    assert names[("a/b-v0", "eval/x", tool.GRADIENT_STEPS)] == os.path.join("out", "a_b-v0__eval_x__gradient_steps.png")


def test_drop_superseded_without_purge_step():
    """A resume that did not pass purge_step: the step going back supersedes the earlier events from there on."""
    steps, values = drop_superseded([0, 100, 200, 200, 300, 150, 250], [1, 2, 3, 4, 5, 6, 7])
    assert steps.tolist() == [0, 100, 150, 250]
    assert values.tolist() == [1, 2, 6, 7]
    steps, values = drop_superseded([0, 100, 100, 200], [1, 2, 3, 4])  # equal steps (several episodes) are kept
    assert steps.tolist() == [0, 100, 100, 200]


def test_env_label_from_path():
    assert parse_run_name("ALE/Breakout-v5__ppo_atari__1__123", {}) == ("ALE/Breakout-v5", "ppo_atari", "1")
    assert parse_run_name("Breakout-v5__ppo_atari__1__123", {"env_id": "ALE/Breakout-v5"})[0] == "ALE/Breakout-v5"
    assert parse_run_name("bench/runs/Hopper-v5__rpo_mujoco__2__9", {"env_id": "Hopper-v5"})[0] == "Hopper-v5"
    assert parse_run_name("sac/cleanrl_equi_BlockPulling-v0__sac__1__slurm7_3",
                          {"env_id": "cleanrl_equi/BlockPulling-v0"}) == (BLOCK, "sac", "1")
    # a name given with --run-name says nothing: the recorded env id, exp_name and seed do
    assert parse_run_name("my_run", {"env_id": BLOCK, "exp_name": "cql_equi_offline", "seed": "4"}) == (
        BLOCK, "cql_equi_offline", "4")
