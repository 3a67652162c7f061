"""sac_equi_bullet.py: exact symmetry on real observations, buffer, CAPS terms, short runs, checkpoints, errors.

Everything runs on CPU with tiny networks (C4 / C8, n_hidden 8, 32x32 images) so the file takes about two minutes.
"""

import math
import os
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi.envs.manipulation import action_smoothness, obs_to_tensor, rotate_batch
from cleanrl_equi.envs.manipulation.scene import rotate_scene_state
from cleanrl_equi.checkpoints import save_checkpoint
from conftest import (QUARTER_TURN, fails_with, load_script, only_run_dir, read_scalars, run_script, script_fails_with,
                      stop_with_signal)

SCRIPT = "sac_equi_bullet.py"
QUARTER_TURN = torch.as_tensor(QUARTER_TURN, dtype=torch.float32)
TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8", "--learning-starts", "8",
        "--num-envs", "2", "--num-demos", "2", "--max-steps", "6", "--total-timesteps", "40", "--eval-frequency", "10",
        "--eval-episodes", "2", "--num-eval-envs", "2", "--log-frequency", "4"]


sac = load_script("sac_equi_bullet")


def tiny_args(**kwargs):
    return sac.Args(**{"group_order": 4, "n_hidden": 8, "image_size": 32, **kwargs})


def real_observations(task: str, image_size: int = 32, steps: int = 4):
    """Observations and scene states along an expert episode (the gripper holds something in picking tasks)."""
    env = gym.make(f"cleanrl_equi/{task}-v0", image_size=image_size).unwrapped
    obs, _ = env.reset(seed=5)
    observations, states = [obs], [env.get_scene_state()]
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(env.expert_action())
        if terminated or truncated:
            break
        observations.append(obs)
        states.append(env.get_scene_state())
    return env, np.stack(observations), states


def turn(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


@pytest.mark.parametrize("task", ["BlockPulling", "DrawerOpening"])
def test_env_turn_matches_the_networks_convention(task):
    """The convention the networks rely on, on real scenes: turning the world +90 degrees about the gripper gives
    torch.rot90(k=1) of the image and (dx, dy) -> R (dx, dy), R = [[0, -1], [1, 0]] (escnn's irrep(1) at 90°)."""
    env, observations, states = real_observations(task, image_size=64, steps=1)
    for obs, state in zip(observations, states):
        env.reset(options={"scene_state": state})
        action = torch.as_tensor(env.expert_action())
        turned_obs, _ = env.reset(options={"scene_state": rotate_scene_state(state, 1)})
        turned_action = torch.as_tensor(env.expert_action())
        differing = (turn(torch.as_tensor(obs[0]).int(), 1) - torch.as_tensor(turned_obs[0]).int()).abs() > 1
        assert differing.float().mean() < 0.002
        torch.testing.assert_close(turned_action[1:3].float(), QUARTER_TURN @ action[1:3].float(), atol=1e-4, rtol=0)
    env.close()
    from cleanrl_equi.equivariant import gspaces

    gspace = gspaces.rot2dOnR2(8)
    np.testing.assert_allclose(gspace.irrep(1)(gspace.fibergroup.element(2)), QUARTER_TURN.numpy(), atol=1e-7)


def test_rotation_augmentation_is_the_same_turn():
    x = obs_to_tensor(real_observations("BlockPulling")[1], "cpu")
    batch = {"obs": x, "next_obs": x.flip(0), "actions": torch.rand(len(x), 5) * 2 - 1}
    turned = rotate_batch(batch, torch.full((len(x),), math.pi / 2))
    torch.testing.assert_close(turned["obs"], turn(x, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned["next_obs"], turn(x.flip(0), 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned["actions"][:, 1:3], batch["actions"][:, 1:3] @ QUARTER_TURN.T)
    torch.testing.assert_close(turned["actions"][:, [0, 3, 4]], batch["actions"][:, [0, 3, 4]])
    assert sac.augment(batch, 0) is batch


def test_caps_terms_zero_for_a_constant_policy_and_positive_otherwise():
    torch.manual_seed(0)
    x = obs_to_tensor(real_observations("BlockPicking")[1], "cpu")
    for model in ("equi", "cnn"):
        actor = sac.EquiActor(tiny_args()) if model == "equi" else sac.CNNActor(tiny_args())
        temporal, spatial = sac.caps_terms(actor, x[:-1], x[1:], sigma=0.05)
        assert temporal.item() > 0 and spatial.item() > 0
        temporal.backward()  # the terms train the actor
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
        with torch.no_grad():  # a policy that ignores its input: every weight before the output bias set to zero
            for name, p in actor.named_parameters():
                if not name.startswith("head.") or "weight" in name:
                    p.zero_()
        temporal, spatial = sac.caps_terms(actor, x[:-1], x[1:], sigma=0.05)
        assert temporal.item() == 0.0 and spatial.item() == 0.0


def test_smoothness_metric():
    constant = np.tile(np.array([0.5, 0.1, -0.2, 0.0, 0.3]), (10, 1))
    alternating = constant * np.array([[1.0], [-1.0]] * 5)
    assert action_smoothness(constant) < 1e-12
    assert action_smoothness(alternating) > action_smoothness(constant + 0.01 * np.arange(10)[:, None]) > 0


def check_scalars(cwd):
    scalars = read_scalars(only_run_dir(cwd))
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/updates_per_second",
                "losses/qf1_loss", "losses/qf2_loss", "losses/qf1_values", "losses/actor_loss", "losses/alpha",
                "losses/alpha_loss", "losses/demo_loss", "losses/caps_temporal", "losses/caps_spatial", "losses/entropy",
                "losses/policy_std",
                "eval/success_rate", "eval/discounted_return", "eval/action_smoothness", "eval/action_change"):
        assert tag in scalars, f"{tag} missing; got {sorted(scalars)}"
        assert all(np.isfinite(v) for _, v in scalars[tag])
    assert len(scalars["eval/success_rate"]) == 2  # after 10 and 20 gradient steps
    assert max(v for _, v in scalars["losses/caps_temporal"]) > 0 and max(v for _, v in scalars["losses/demo_loss"]) > 0


def test_short_cnn_run_writes_the_scalars(workdir):
    proc = run_script(SCRIPT, *TINY, "--model", "cnn", "--demo-loss-weight", "1", "--caps-temporal-weight", "0.1",
                      "--caps-spatial-weight", "0.1", cwd=workdir)
    assert "demo episodes" in proc.stdout and "eval @ 20 gradient steps" in proc.stdout
    check_scalars(workdir)


def test_short_equi_run_writes_the_scalars_and_its_checkpoint_acts_the_same(workdir):
    proc = run_script(SCRIPT, *TINY, "--demo-loss-weight", "1", "--caps-temporal-weight", "0.1",
                      "--caps-spatial-weight", "0.1", "--save-model", cwd=workdir)
    assert "demo episodes" in proc.stdout and "eval @ 20 gradient steps" in proc.stdout
    check_scalars(workdir)
    # save -> load in a fresh process -> the same evaluation episodes give the same metrics, to every digit
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs if f.endswith(".cleanrl_model")]
    in_training = re.search(r"final eval: (.*)", proc.stdout).group(1)
    proc = run_script(SCRIPT, "--eval-checkpoint", path, "--eval-episodes", "2", "--num-eval-envs", "2", cwd=workdir)
    assert re.search(r"\(equi\): (.*)", proc.stdout).group(1) == in_training
    checkpoint = torch.load(path, weights_only=False)
    assert not any("filter" in key or "expanded_bias" in key for key in checkpoint["actor"])  # parameters only
    x = obs_to_tensor(real_observations("BlockPulling")[1], "cpu")
    (actor_a, _), (actor_b, _) = sac.load_actor(path, "cpu"), sac.load_actor(path, "cpu")
    with torch.no_grad():
        first = actor_a(x)[0]
        actor_b.eval()  # the cached eval-mode filters give the same actions as train mode
        torch.testing.assert_close(actor_b(x)[0], first, atol=1e-6, rtol=0)
        actor_b.train()
        torch.testing.assert_close(actor_b(x)[0], first, atol=0, rtol=0)


@pytest.mark.parametrize("args, words", [
    (dict(env_id="cleanrl_equi/NoSuchTask-v0"), "unknown env id"),
    (dict(env_id="CartPole-v1"), "not a manipulation task"),
    (dict(image_size=100), "--image-size"),
    (dict(group_order=6), "--group-order"),
    (dict(batch_size=256, learning_starts=100), "--learning-starts"),
    (dict(num_demos=0, demo_loss_weight=1.0), "--num-demos"),
    (dict(buffer_size=10), "--buffer-size"),
])
def test_bad_settings_stop_with_one_sentence(args, words, capsys):
    fails_with(capsys, [words], sac.check_args, tiny_args(**args))


def test_bad_checkpoints_stop_with_one_sentence(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.cleanrl_model"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = str(tmp_path / "foreign.cleanrl_model")
    save_checkpoint(foreign, "ppo_atari_equi", tiny_args(), model={})
    mismatched = str(tmp_path / "mismatched.cleanrl_model")
    other_actor = sac.EquiActor(tiny_args(n_hidden=16))
    save_checkpoint(mismatched, "sac_equi_bullet", tiny_args(), actor=other_actor.state_dict())
    for path, words in ((str(tmp_path / "missing.cleanrl_model"), "does not exist"), (str(corrupt), "corrupt"),
                        (foreign, "ppo_atari_equi"), (mismatched, "does not fit")):
        fails_with(capsys, [words], sac.load_actor, path, "cpu")


@pytest.mark.parametrize("flag, value, choice", [("--env-id", "cleanrl_equi/NoSuchTask-v0", "cleanrl_equi/BlockPulling-v0"),
                                                 ("--model", "mlp", "cnn")])
def test_unknown_choices_from_the_command_line_name_the_choices(flag, value, choice, workdir):
    """Enumerations are Literal types: tyro refuses another value before anything starts, listing the choices."""
    proc = run_script(SCRIPT, flag, value, cwd=workdir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice" in proc.stderr and choice in proc.stderr and not os.path.exists(os.path.join(workdir, "runs"))


def test_stopped_run_resumes_with_its_replay_buffer(workdir):
    """USR1 (SLURM's warning before the time limit) stops the run with a resume file holding the networks,
    optimisers, RNG and replay buffer; the same command continues it from the same global step, without new demos,
    and every step is logged once. (The envs restart fresh episodes, so the weights are not bit-identical to an
    uninterrupted run's; the offline scripts, which have no envs in the loop, are checked for that.)"""
    flags = [*TINY, "--total-timesteps", "60", "--run-name", "r", "--checkpoint-minutes", "0",
             "--progress-interval", "0", "--log-frequency", "1"]
    stop_with_signal(SCRIPT, *flags, cwd=workdir, at="step 30/")
    resume_file = os.path.join(workdir, "runs", "r", "resume.pt")
    saved = torch.load(resume_file, weights_only=False)
    assert saved["global_step"] >= 30 and saved["state"]["replay_buffer"]["valid"].sum() > 30  # demos + agent steps

    resumed = run_script(SCRIPT, *flags, cwd=workdir)
    assert f"resuming runs/r from global step {saved['global_step']}" in resumed.stdout
    assert "demo episodes" not in resumed.stdout  # the demos came back with the buffer
    scalars = read_scalars(os.path.join(workdir, "runs", "r"))
    steps = [step for step, _ in scalars["charts/gradient_steps"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # increasing, each step once, to the end
    gradient_steps = [int(v) for _, v in scalars["charts/gradient_steps"]]
    assert gradient_steps == list(range(gradient_steps[0], gradient_steps[0] + len(gradient_steps)))  # no gap

    proc = run_script(SCRIPT, *flags[:-8], "--model", "cnn", "--run-name", "r", cwd=workdir, check=False)
    script_fails_with(proc, "--model")
