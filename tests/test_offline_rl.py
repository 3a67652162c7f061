"""cql_equi_offline.py and iql_equi_offline.py: the losses against hand-computed values, short training runs on a
tiny dataset, resumption after a stop signal, the env settings a dataset was collected in, and clear errors for bad
data (the networks' symmetry is checked in test_networks.py)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi.datasets import collect_expert, save_dataset
from conftest import (load_script, one_sentence, only_run_dir, read_scalars, run_script, script_fails_with,
                      stop_with_signal)

TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--max-steps", "6", "--batch-size", "4",
        "--eval-episodes", "2", "--num-eval-envs", "2", "--log-frequency", "1"]


cql = load_script("cql_equi_offline")
iql = load_script("iql_equi_offline")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Three planner episodes of Block Pulling at 32 px (a real, if small, offline dataset)."""
    path = str(tmp_path_factory.mktemp("data") / "block_pulling_expert.npz")
    save_dataset(path, collect_expert("cleanrl_equi/BlockPulling-v0", 3, seed=0, image_size=32, max_steps=6))
    return path


def test_cql_gap_matches_a_hand_computation():
    q_data = torch.tensor([1.0, 2.0])
    q_uniform = torch.tensor([[0.5], [1.5]])
    q_current, logp_current = torch.tensor([[1.0], [0.0]]), torch.tensor([[-1.0], [0.5]])
    q_next, logp_next = torch.tensor([[2.0], [1.0]]), torch.tensor([[0.0], [-2.0]])
    log_uniform = 5 * math.log(0.5)
    for temperature in (1.0, 2.0):
        by_hand = []
        for b in range(2):
            terms = [q_uniform[b, 0] - log_uniform, q_current[b, 0] - logp_current[b, 0], q_next[b, 0] - logp_next[b, 0]]
            by_hand.append(temperature * math.log(sum(math.exp(float(t) / temperature) for t in terms)))
        expected = sum(by_hand) / 2 - 1.5
        got = cql.cql_gap(q_data, q_uniform, q_current, logp_current, q_next, logp_next, temperature)
        assert got.item() == pytest.approx(expected, abs=1e-5)


def test_repeat_rows_keeps_each_states_samples_together():
    x = torch.arange(6.0).view(3, 2)
    repeated = cql.repeat_rows(x, 2)
    assert repeated.shape == (6, 2) and torch.equal(repeated.view(3, 2, 2)[:, 1], x)


def test_iql_losses_match_hand_computations():
    q, v = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    # diffs q - v = (1, -1, 0): weights (0.8, 0.2, any); squared (1, 1, 0)
    assert iql.expectile_loss(q, v, 0.8).item() == pytest.approx((0.8 + 0.2 + 0.0) / 3)
    assert iql.expectile_loss(q, v, 0.5).item() == pytest.approx(2 * 0.5 / 3)
    log_prob, advantage = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([0.5, -0.5, 10.0])
    weights = [math.exp(0.5 / 0.5), math.exp(-0.5 / 0.5), 100.0]  # the last one clipped
    expected = -(weights[0] * -1.0 + weights[1] * -2.0 + weights[2] * -3.0) / 3
    assert iql.awr_loss(log_prob, advantage, beta=0.5, max_weight=100.0).item() == pytest.approx(expected, rel=1e-6)
    advantage.requires_grad_(True)
    iql.awr_loss(log_prob.requires_grad_(True), advantage, 0.5, 100.0).backward()
    assert advantage.grad is None or advantage.grad.abs().sum() == 0  # the weights carry no gradient


def test_squashed_log_prob_is_the_density_of_the_deployed_action():
    """log pi(a|s) of a = tanh(u), u ~ N(mean, std): the Normal density of atanh(a) / prod(1 - a^2)."""
    mean, log_std = torch.tensor([[0.2, -0.1, 0.0, 0.3, 0.5]]), torch.tensor([[-1.0, -0.5, 0.0, -2.0, -1.0]])
    a = torch.tensor([[0.5, -0.3, 0.1, 0.9, 0.0]])
    u = torch.atanh(a)
    std = log_std.exp()
    by_hand = (-0.5 * ((u - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi) - torch.log(1 - a**2))
    assert iql.squashed_log_prob(mean, log_std, a).item() == pytest.approx(by_hand.sum().item(), abs=1e-4)
    # the deterministic deployed action tanh(mean) is the mode of the squashed density only in the pre-tanh space,
    # but a data action at the bound stays finite
    assert torch.isfinite(iql.squashed_log_prob(mean, log_std, torch.ones(1, 5)))


@pytest.mark.parametrize("script,model,scalars", [
    ("cql_equi_offline.py", "equi", ["losses/cql1_gap", "losses/cql_loss", "losses/alpha", "losses/qf1_loss"]),
    ("cql_equi_offline.py", "cnn", ["losses/cql_alpha", "losses/cql_loss"]),
    ("iql_equi_offline.py", "equi", ["losses/value_loss", "losses/advantage", "losses/qf1_loss"]),
    ("iql_equi_offline.py", "cnn", ["losses/value_loss"]),
])
def test_short_run_writes_the_scalars_and_a_usable_model(script, model, scalars, tiny_dataset, workdir):
    extra = ["--cql-lagrange"] if script.startswith("cql") and model == "cnn" else []
    run_script(script, *TINY, "--model", model, "--dataset", tiny_dataset, "--total-timesteps", "6",
               "--eval-frequency", "3", "--save-model", *extra, cwd=workdir)
    run_dir = only_run_dir(workdir)
    logged = read_scalars(run_dir)
    for tag in scalars + ["losses/actor_loss", "charts/SPS", "eval/success_rate", "eval/discounted_return",
                          "eval/best_success_rate", "eval/best_discounted_return"]:
        assert tag in logged, f"{tag} missing from {sorted(logged)}"
    assert [step for step, _ in logged["losses/actor_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in logged["eval/success_rate"]] == [3, 6]
    assert all(math.isfinite(value) for _, value in logged["losses/qf1_loss"])
    if extra:  # the Lagrange multiplier moves: down while the gap is under --cql-target-gap (10), as it is here
        multipliers = [value for _, value in logged["losses/cql_alpha"]]
        gaps = [value for _, value in logged["losses/cql1_gap"]]
        assert all(gap < 10 for gap in gaps) and multipliers == sorted(multipliers, reverse=True)
        assert multipliers[-1] < multipliers[0] == 1.0  # logged before each step's update; starts at 1
    model_file = os.path.join(run_dir, script.replace(".py", ".cleanrl_model"))
    proc = run_script(script, "--eval-checkpoint", model_file, "--eval-episodes", "2", "--num-eval-envs", "1",
                      cwd=workdir)
    assert "success" in proc.stdout and "over 2 episodes" in proc.stdout
    resumable = run_script(script, "--eval-checkpoint", os.path.join(run_dir, "resume.pt"), "--eval-episodes", "2",
                           "--num-eval-envs", "1", cwd=workdir)  # the resume file holds the same actor
    assert [line for line in resumable.stdout.splitlines() if "success" in line] == \
        [line for line in proc.stdout.splitlines() if "success" in line]


def final_weights(run_dir: str, script: str) -> dict:
    return torch.load(os.path.join(run_dir, f"{script}.cleanrl_model"), weights_only=False)


@pytest.mark.parametrize("script", ["cql_equi_offline", "iql_equi_offline"])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(script, tiny_dataset, workdir):
    """USR1 (SLURM's warning before the time limit) stops the run at a step boundary with a resume file; the same
    command continues it: every step logged exactly once, and the final weights equal an uninterrupted run's."""
    flags = [*TINY, "--dataset", tiny_dataset, "--total-timesteps", "30", "--eval-frequency", "1000",
             "--checkpoint-minutes", "0", "--save-model", "--progress-interval", "0"]
    run_script(f"{script}.py", *flags, "--run-name", "straight", cwd=workdir)

    output = stop_with_signal(f"{script}.py", *flags, "--run-name", "stopped", cwd=workdir, at="step 8/")
    assert "run the same command with --run-name stopped to resume" in output
    stopped_dir = os.path.join(workdir, "runs", "stopped")
    assert os.path.exists(os.path.join(stopped_dir, "resume.pt"))
    assert not os.path.exists(os.path.join(stopped_dir, f"{script}.cleanrl_model"))

    resumed = run_script(f"{script}.py", *flags, "--run-name", "stopped", cwd=workdir)
    assert "resuming runs/stopped from global step" in resumed.stdout
    steps = [step for step, _ in read_scalars(stopped_dir)["losses/qf1_loss"]]
    assert steps == list(range(1, 31)), steps  # continuous, no gap, no duplicate
    straight = final_weights(os.path.join(workdir, "runs", "straight"), script)
    again = final_weights(stopped_dir, script)
    for part in ("actor", "critic", "critic_target"):
        for key, tensor in straight[part].items():
            assert torch.equal(tensor, again[part][key]), f"{part}.{key} differs after resuming"
    straight_scalars = read_scalars(os.path.join(workdir, "runs", "straight"))["losses/qf1_loss"]
    assert read_scalars(stopped_dir)["losses/qf1_loss"] == straight_scalars


def test_resume_refuses_other_settings_and_other_scripts(tiny_dataset, workdir):
    flags = [*TINY, "--dataset", tiny_dataset, "--total-timesteps", "4", "--eval-frequency", "1000",
             "--run-name", "r"]
    run_script("cql_equi_offline.py", *flags, cwd=workdir)
    resume_file = os.path.join(workdir, "runs", "r", "resume.pt")
    # replace the finished run's resume file by one saved under other settings (--n-hidden, --group-order)
    from cleanrl_equi.checkpoints import save_resume

    save_resume(os.path.join(workdir, "runs", "r"), "cql_equi_offline",
                cql.Args(**{**vars(cql.Args()), "group_order": 4, "n_hidden": 8}), global_step=2)
    proc = run_script("cql_equi_offline.py", *flags, cwd=workdir, check=False)
    script_fails_with(proc, "other settings")
    assert os.path.exists(resume_file)
    proc = run_script("iql_equi_offline.py", *flags, cwd=workdir, check=False)
    script_fails_with(proc, "holds a run of cql_equi_offline, not iql_equi_offline")


@pytest.mark.parametrize("problem", ["missing", "corrupt", "other task", "other size"])
def test_bad_dataset_stops_with_one_sentence(problem, tiny_dataset, workdir):
    path, flags = tiny_dataset, list(TINY)
    if problem == "missing":
        path = os.path.join(workdir, "nope.npz")
    elif problem == "corrupt":
        path = os.path.join(workdir, "corrupt.npz")
        with open(tiny_dataset, "rb") as src, open(path, "wb") as dst:
            content = src.read()
            dst.write(content[: len(content) // 2])
    elif problem == "other task":
        flags += ["--env-id", "cleanrl_equi/BlockPushing-v0"]
    else:
        flags[flags.index("--image-size") + 1] = "64"
    proc = run_script("iql_equi_offline.py", *flags, "--dataset", path, "--total-timesteps", "2", cwd=workdir,
                      check=False)
    script_fails_with(proc)


@pytest.mark.parametrize("flags,words", [
    (["--expectile", "1.0"], "--expectile"),
    (["--beta", "0"], "--beta"),
])
def test_bad_settings_stop_with_one_sentence(flags, words, workdir):
    proc = run_script("iql_equi_offline.py", *flags, cwd=workdir, check=False)
    script_fails_with(proc, words)


@pytest.mark.parametrize("script", ["cql_equi_offline.py", "iql_equi_offline.py"])
def test_an_unknown_model_is_refused_by_the_command_line(script, workdir):
    """--model is a choice: tyro refuses anything else before the script starts, and names the choices."""
    proc = run_script(script, "--model", "mlp", cwd=workdir, check=False)
    assert proc.returncode != 0 and "mlp" in proc.stderr
    assert "equi" in proc.stderr and "cnn" in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "runs"))


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory):
    """Two planner episodes of Block Pulling at 32 px in a 0.4 m workspace with pi/8 turns (not BulletArm's)."""
    path = str(tmp_path_factory.mktemp("data") / "block_pulling_wide.npz")
    settings = {**cql.Args(image_size=32, max_steps=6).env_settings(), "workspace_size": 0.4, "drot_n": 8}
    save_dataset(path, collect_expert("cleanrl_equi/BlockPulling-v0", 2, seed=0, image_size=32, max_steps=6,
                                      env_settings=settings))
    return path


@pytest.mark.parametrize("script", ["cql_equi_offline.py", "iql_equi_offline.py"])
def test_a_dataset_of_other_env_settings_is_refused_and_its_own_are_used(script, wide_dataset, workdir):
    """The dataset records the env settings it was collected in: a run in other settings stops with one sentence
    that names the differing flags and the values to pass; with those flags it trains, and its run (evaluation envs
    included) is in the dataset's settings."""
    flags = [*TINY, "--dataset", wide_dataset, "--total-timesteps", "2", "--eval-frequency", "1000",
             "--eval-episodes", "1", "--num-eval-envs", "1"]
    sentence = script_fails_with(run_script(script, *flags, cwd=workdir, check=False),
                                 "was collected with --workspace-size 0.4 --drot-n 8",
                                 "not --workspace-size 0.3 --drot-n 4", "pass --workspace-size 0.4 --drot-n 8")
    assert "--max-steps" not in sentence.split("; pass")[0]  # only the settings that differ
    assert not os.path.exists(os.path.join(workdir, "runs"))
    script_fails_with(run_script(script, *flags, "--workspace-size", "0.4", cwd=workdir, check=False),
                      "--drot-n 8", "not --drot-n 4")
    proc = run_script(script, *flags, "--workspace-size", "0.4", "--drot-n", "8", "--run-name", "wide", cwd=workdir)
    assert "eval @ 2 gradient steps" in proc.stdout
    with open(os.path.join(workdir, "runs", "wide", "run.json")) as f:
        recorded = json.load(f)["args"]
    assert recorded["workspace_size"] == 0.4 and recorded["drot_n"] == 8  # what evaluate() builds its envs from


def test_the_collect_command_a_refusal_quotes_makes_a_dataset_the_run_accepts(workdir):
    """The `make_dataset` line in the refusal collects in the run's settings: the dataset it makes is accepted."""
    flags = [*TINY, "--workspace-size", "0.4", "--total-timesteps", "1", "--eval-frequency", "1000",
             "--eval-episodes", "1", "--num-eval-envs", "1"]
    proc = run_script("iql_equi_offline.py", *flags, "--dataset", os.path.join(workdir, "missing.npz"), cwd=workdir,
                      check=False)
    sentence = one_sentence(proc.stderr, "does not exist")
    command = sentence[sentence.index("`") + 1:sentence.rindex("`")].split()
    assert command[:5] == ["uv", "run", "python", "-m", "cleanrl_equi.tools.make_dataset"]
    assert "--workspace-size" in command and "--max-steps" in command
    subprocess.run([sys.executable, *command[3:], "--num-episodes", "2"], cwd=workdir, check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    run_script("iql_equi_offline.py", *flags, "--dataset", os.path.join(workdir, "missing.npz"), cwd=workdir)


def test_default_dataset_is_built_once_and_used(workdir, monkeypatch):
    """No --dataset: the script builds a small planner dataset of the task once, caches it and trains on it."""
    monkeypatch.setenv("CLEANRL_EQUI_DATA", os.path.join(workdir, "cache"))
    flags = [*TINY, "--default-dataset-episodes", "2", "--total-timesteps", "2", "--eval-frequency", "1000",
             "--eval-episodes", "1", "--num-eval-envs", "1"]
    first = run_script("cql_equi_offline.py", *flags, cwd=workdir)
    assert "expert data" in first.stdout and os.listdir(os.path.join(workdir, "cache"))
    cached = sorted(os.listdir(os.path.join(workdir, "cache")))
    second = run_script("iql_equi_offline.py", *flags, cwd=workdir)
    assert sorted(os.listdir(os.path.join(workdir, "cache"))) == cached
    assert "dataset" in second.stdout and "expert data" in second.stdout
