"""cleanrl_equi.tools.plot_runs on synthetic TensorBoard runs whose curves, last and best values are known by hand."""

import csv
import math
import os
import subprocess
import sys
import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.tools.plot_runs import drop_superseded, parse_run_name
from conftest import REPO, script_fails_with
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}  # Student-t 0.975 quantiles by degrees of freedom


def write_run(run_dir, hparams, points, purge_step=None):
    """One event file in `run_dir`: the hyperparameters table as the scripts log it, then (tag, step, value)s."""
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))
    for tag, step, value in points:
        writer.add_scalar(tag, value, step)
    writer.close()


def ppo_value(seed, k):
    """ppo: 10*seed + k at step 100*k, with a peak of 50 + seed at k = 5 (so best != last)."""
    return 50.0 + seed if k == 5 else 10.0 * seed + k


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """ALE/Pong-v5: ppo (model cnn) and ppo_equi (model equi), 3 seeds each, seed 3 of ppo_equi resumed with
    purge_step; cleanrl_equi_BlockPulling-v0: sac with 4 seeds, model equi (seeds 1, 2) and cnn (seeds 3, 4)."""
    root = tmp_path_factory.mktemp("runs")
    ret = "charts/episodic_return"
    for seed in (1, 2, 3):
        # the seeds log at different steps: 100*k + 10*(seed-1), so the last steps are 1000, 1010, 1020
        write_run(str(root / "ALE" / f"Pong-v5__ppo__{seed}__100{seed}"),
                  {"exp_name": "ppo", "seed": seed, "env_id": "ALE/Pong-v5", "model": "cnn"},
                  [(ret, 100 * k + 10 * (seed - 1), ppo_value(seed, k)) for k in range(11)])
    for seed in (1, 2):  # 2k + seed: last = best = 20 + seed
        write_run(str(root / "ALE" / f"Pong-v5__ppo_equi__{seed}__200{seed}"),
                  {"exp_name": "ppo_equi", "seed": seed, "env_id": "ALE/Pong-v5", "model": "equi"},
                  [(ret, 100 * k, 2.0 * k + seed) for k in range(11)])
    # Seed 3 is interrupted and resumed from step 600: the first file's events at steps >= 600 (with a peak of 500
    # at step 800) are superseded by the second file's 2k + 4, so last = best = 24.
    resumed = str(root / "ALE" / "Pong-v5__ppo_equi__3__2003")
    hparams = {"exp_name": "ppo_equi", "seed": 3, "env_id": "ALE/Pong-v5", "model": "equi"}
    write_run(resumed, hparams, [(ret, 100 * k, 500.0 if k == 8 else 2.0 * k + 3) for k in range(11)])
    time.sleep(1.05)  # event file names start with the unix time: the resumed part sorts after the first part
    write_run(resumed, hparams, [(ret, 100 * k, 2.0 * k + 4) for k in range(6, 11)], purge_step=600)
    assert len(os.listdir(resumed)) == 2
    for seed in (1, 2, 3, 4):  # success rate k * seed / 100: last = best = seed / 10
        write_run(str(root / f"cleanrl_equi_BlockPulling-v0__sac__{seed}__300{seed}"),
                  {"exp_name": "sac", "seed": seed, "env_id": "cleanrl_equi/BlockPulling-v0",
                   "model": "equi" if seed <= 2 else "cnn"},
                  [("eval/success_rate", 100 * k, k * seed / 100) for k in range(11)])
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
    # sac's runs differ in --model: two experiments without being told (ppo's and ppo_equi's runs each agree)
    assert set(md) == {("ALE/Pong-v5", "ppo", ret), ("ALE/Pong-v5", "ppo_equi", ret),
                       ("cleanrl_equi_BlockPulling-v0", "sac[model=cnn]", "eval/success_rate"),
                       ("cleanrl_equi_BlockPulling-v0", "sac[model=equi]", "eval/success_rate")}  # absent tags left out

    ppo_last = [10.0 * s + 10 for s in (1, 2, 3)]  # 20, 30, 40
    ppo_best = [max(ppo_value(s, k) for k in range(11)) for s in (1, 2, 3)]  # 51, 52, 53
    row = table[("ALE/Pong-v5", "ppo", ret)]
    assert int(row["seeds"]) == 3
    assert float(row["last_mean"]) == pytest.approx(30.0)
    assert float(row["last_ci95"]) == pytest.approx(half_width(ppo_last), rel=1e-6)
    assert float(row["best_mean"]) == pytest.approx(sum(ppo_best) / 3) == 52.0
    assert float(row["best_ci95"]) == pytest.approx(half_width(ppo_best), rel=1e-6)
    assert (int(row["steps_min"]), int(row["steps_max"])) == (1000, 1020)
    assert md[("ALE/Pong-v5", "ppo", ret)] == ["3", "30 ± 24.8", "52", "1000–1020"]

    # the resumed seed counts once, with its superseded events (the 500 peak, 2k + 3 from step 600) dropped
    equi = [21.0, 22.0, 24.0]
    row = table[("ALE/Pong-v5", "ppo_equi", ret)]
    assert int(row["seeds"]) == 3
    assert float(row["last_mean"]) == pytest.approx(sum(equi) / 3)
    assert float(row["last_ci95"]) == pytest.approx(half_width(equi), rel=1e-6)
    assert float(row["best_mean"]) == pytest.approx(sum(equi) / 3)
    assert md[("ALE/Pong-v5", "ppo_equi", ret)] == ["3", "22.3 ± 3.79", "22.3", "1000"]

    row = table[("cleanrl_equi_BlockPulling-v0", "sac[model=equi]", "eval/success_rate")]
    assert int(row["seeds"]) == 2 and float(row["last_mean"]) == pytest.approx(0.15)  # seeds 1, 2
    row = table[("cleanrl_equi_BlockPulling-v0", "sac[model=cnn]", "eval/success_rate")]
    assert int(row["seeds"]) == 2 and float(row["best_mean"]) == pytest.approx(0.35)  # seeds 3, 4


def test_group_by_hyperparameter(runs_root, tmp_path):
    out = str(tmp_path / "plots")
    plot_runs(runs_root, "--out", out, "--group-by", "model", "--points", "20", "--smooth", "3")
    md, table = read_summary(out)
    sr = "eval/success_rate"
    assert {key[1] for key in table} == {"ppo[model=cnn]", "ppo_equi[model=equi]", "sac[model=cnn]",
                                         "sac[model=equi]"}
    equi = table[("cleanrl_equi_BlockPulling-v0", "sac[model=equi]", sr)]
    cnn = table[("cleanrl_equi_BlockPulling-v0", "sac[model=cnn]", sr)]
    assert (int(equi["seeds"]), int(cnn["seeds"])) == (2, 2)
    assert float(equi["last_mean"]) == pytest.approx(0.15)  # seeds 1, 2
    assert float(cnn["last_mean"]) == pytest.approx(0.35)  # seeds 3, 4
    assert float(cnn["last_ci95"]) == pytest.approx(half_width([0.3, 0.4]), rel=1e-6)
    assert md[("cleanrl_equi_BlockPulling-v0", "sac[model=cnn]", sr)] == ["2", "0.35 ± 0.635", "0.35", "1000"]
    assert os.path.isfile(os.path.join(out, "cleanrl_equi_BlockPulling-v0__eval_success_rate.png"))


def test_group_by_none_and_repeated_seeds(runs_root, tmp_path):
    """`--group-by none` keeps sac's models together; runs that share a seed are one seed (averaged), not two."""
    out = str(tmp_path / "plots")
    plot_runs(runs_root, "--out", out, "--group-by", "none")
    row = read_summary(out)[1][("cleanrl_equi_BlockPulling-v0", "sac", "eval/success_rate")]
    assert (int(row["seeds"]), float(row["last_mean"])) == (4, pytest.approx(0.25))

    root = tmp_path / "repeated"
    for run, (seed, final) in enumerate([(1, 0.2), (1, 0.4), (2, 0.6)]):  # seed 1 run twice
        write_run(str(root / f"cleanrl_equi_BlockPulling-v0__sac__{seed}__{run}"),
                  {"exp_name": "sac", "seed": seed, "env_id": "cleanrl_equi/BlockPulling-v0", "model": "equi"},
                  [("eval/success_rate", 100 * k, final * k / 10) for k in range(11)])
    plot_runs(str(root), "--out", out)
    md, table = read_summary(out)
    row = table[("cleanrl_equi_BlockPulling-v0", "sac", "eval/success_rate")]
    assert (int(row["seeds"]), int(row["runs"])) == (2, 3)
    assert float(row["last_mean"]) == pytest.approx((0.3 + 0.6) / 2)  # seed 1's two runs averaged first
    assert float(row["last_ci95"]) == pytest.approx(half_width([0.3, 0.6]), rel=1e-6)
    assert md[("cleanrl_equi_BlockPulling-v0", "sac", "eval/success_rate")][0] == "2 (3 runs)"


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
                          {"env_id": "cleanrl_equi/BlockPulling-v0"}) == ("cleanrl_equi_BlockPulling-v0", "sac", "1")
