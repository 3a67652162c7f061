"""sac_equi_bullet.py follows the ICLR-2022 paper (Wang, Walters, Platt, "SO(2)-Equivariant Reinforcement
Learning") by default: its env settings and task sizes, and SACfD's prioritised replay (alpha 0.6, beta 0.4 -> 1,
|TD| + 1e-6 + 1 for demonstrations, demonstrations kept when the buffer wraps, weighted critic loss).

CPU only, tiny networks and 16-32 px images.
"""

import math
import os

import numpy as np
import pytest
import torch

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi.envs.manipulation import make_envs
from cleanrl_equi.checkpoints import save_checkpoint
from conftest import fails_with, load_script, read_scalars, run_script, stop_with_signal

SCRIPT = "sac_equi_bullet.py"
CPU = torch.device("cpu")
sac = load_script("sac_equi_bullet")


# ---- The paper's setting is the default ---------------------------------------------------------------------------
def built_env(args):
    """The first env of the vector env the script trains (and evaluates) on with these Args."""
    envs = make_envs(args, 1)
    envs.reset(seed=0)
    return envs, envs.unwrapped.envs[0].unwrapped


def test_defaults_are_the_papers_setting():
    args = sac.Args()
    assert (args.workspace_size, args.dpos, args.drot_n, args.max_steps) == (0.4, 0.05, 8, 100)
    assert (args.image_size, args.num_envs, args.num_demos, args.group_order, args.n_hidden) == (128, 5, 20, 8, 64)
    assert (args.batch_size, args.buffer_size, args.gamma, args.tau, args.alpha) == (64, 100_000, 0.99, 0.01, 0.01)
    assert args.paper_tasks and not args.prioritized_replay and args.demo_loss_weight == 0
    assert (args.per_alpha, args.per_beta, args.per_eps, args.per_expert_bonus) == (0.6, 0.4, 1e-6, 1.0)
    sac.check_args(args)

    envs, env = built_env(sac.Args(image_size=16))
    assert env.workspace_size == 0.4 and env.dpos == 0.05 and env.drot == pytest.approx(math.pi / 8)
    assert env.max_steps == 100 and env.spec.max_episode_steps == 100
    assert env.pixel_size * 16 == pytest.approx(0.6)  # the paper's 0.6 m field of view
    assert env.block_half == (0.05, 0.05, 0.025) and env.block_mass == 0.5  # 10 x 10 x 5 cm blocks of 0.5 kg
    envs.close()
    for task, attributes in (("BlockPicking", {"lift_height": 0.08}),
                             ("CornerPicking", {"lift_height": 0.08, "cube_size": 0.05})):
        envs, env = built_env(sac.Args(image_size=16, env_id=f"cleanrl_equi/{task}-v0"))
        assert {name: getattr(env, name) for name in attributes} == attributes and env.workspace_size == 0.4
        envs.close()


def test_bulletarm_settings_and_other_scripts_keep_the_env_defaults():
    flags = dict(image_size=16, workspace_size=0.3, drot_n=4, max_steps=50, paper_tasks=False)
    envs, env = built_env(sac.Args(**flags))
    assert (env.workspace_size, env.drot, env.max_steps) == (0.3, math.pi / 4, 50)
    assert env.block_half == (0.04, 0.04, 0.02) and env.block_mass == 0.2
    envs.close()
    cql = load_script("cql_equi_offline")  # its Args hold BulletArm's env defaults, as its datasets were collected
    envs, env = built_env(cql.Args(image_size=16))
    assert (env.workspace_size, env.dpos, env.drot, env.max_steps) == (0.3, 0.05, math.pi / 4, 50)
    assert env.block_half == (0.04, 0.04, 0.02)
    envs.close()


def test_a_model_saved_before_the_env_flags_is_refused_and_a_new_one_carries_its_setting(tmp_path, capsys):
    """A model file from before the env settings were recorded cannot say which env it was trained in: one sentence;
    today's files carry their settings, and evaluation rebuilds exactly those envs."""
    args = sac.Args(group_order=4, n_hidden=8, image_size=16, max_steps=50, workspace_size=0.3)
    old_args = {k: v for k, v in vars(args).items() if k not in ("workspace_size", "dpos", "drot_n", "paper_tasks")}
    path = str(tmp_path / "old.cleanrl_model")
    torch.save({"script": "sac_equi_bullet", "args": old_args, "actor": sac.EquiActor(args).state_dict()}, path)
    fails_with(capsys, ["was written before", "train it again"], sac.load_actor, path, CPU)
    new = str(tmp_path / "new.cleanrl_model")
    save_checkpoint(new, "sac_equi_bullet", args, actor=sac.EquiActor(args).state_dict())
    _, saved = sac.load_actor(new, CPU)
    assert (saved.workspace_size, saved.drot_n, saved.paper_tasks, saved.max_steps) == (0.3, 8, True, 50)


@pytest.mark.parametrize("task", ["BlockPulling", "BlockPicking", "CornerPicking"])
def test_planner_solves_the_changed_tasks_in_the_papers_setting(task):
    """The tasks whose sizes or thresholds the paper changes, in the envs the script builds (a few seeds; 200 seeds
    each succeeded when this was written, in 6.7 to 10.9 steps on average)."""
    envs, env = built_env(sac.Args(image_size=16, env_id=f"cleanrl_equi/{task}-v0"))
    for seed in (0, 1, 2):
        envs.reset(seed=seed)
        for step in range(1, 31):
            _, rewards, terminations, truncations, infos = envs.step(np.stack(envs.unwrapped.call("expert_action")))
            if terminations[0] or truncations[0]:
                break
        assert infos["is_success"][0] and terminations[0] and rewards[0] == 1.0, f"{task} seed {seed}"
    envs.close()


@pytest.mark.parametrize("flags, words", [
    (dict(workspace_size=0.2), "--workspace-size"),
    (dict(dpos=0.5), "--dpos"),
    (dict(drot_n=1), "--drot-n"),
    (dict(per_alpha=1.5), "--per-alpha"),
    (dict(per_beta=-0.1), "--per-beta"),
    (dict(per_eps=0.0), "--per-eps"),
    (dict(per_expert_bonus=-1.0), "--per-expert-bonus"),
])
def test_bad_env_and_per_settings_stop_with_one_sentence(flags, words, capsys):
    fails_with(capsys, [words], sac.check_args, sac.Args(**flags))


# ---- A tiny SACfD + prioritised replay run ------------------------------------------------------------------------
TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8", "--learning-starts", "8",
        "--num-envs", "2", "--num-demos", "2", "--max-steps", "6", "--eval-frequency", "10", "--eval-episodes", "2",
        "--num-eval-envs", "2", "--env-id", "cleanrl_equi/BlockStacking-v0", "--demo-loss-weight", "1",
        "--prioritized-replay", "--no-cuda"]


def test_sacfd_with_prioritized_replay_logs_and_resumes(workdir):
    """SIGUSR1 stops the run with a resume file whose buffer holds the priorities and the kept demonstrations; the
    same command continues, and beta reaches 1 at the last gradient step."""
    flags = [*TINY, "--total-timesteps", "60", "--run-name", "r", "--checkpoint-minutes", "0",
             "--progress-interval", "0", "--log-frequency", "1"]
    stop_with_signal(SCRIPT, *flags, cwd=workdir, at="step 30/")
    saved = torch.load(os.path.join(workdir, "runs", "r", "resume.pt"), weights_only=False)
    buffer = saved["state"]["replay_buffer"]
    keep = buffer["keep"]
    assert keep > 0 and buffer["expert"][:keep].sum() >= 6 and not buffer["expert"][keep:].any()
    priorities = buffer["priorities"][buffer["valid"]]
    assert (priorities > 0).all() and len(np.unique(priorities.numpy())) > 2  # updated from TD errors
    assert buffer["max_priority"] > 1.0  # at least one demonstration's |TD| + 1

    resumed = run_script(SCRIPT, *flags, cwd=workdir)
    assert f"resuming runs/r from global step {saved['global_step']}" in resumed.stdout
    assert "demo episodes" not in resumed.stdout
    scalars = read_scalars(os.path.join(workdir, "runs", "r"))
    for tag in ("charts/per_beta", "losses/is_weight_mean", "losses/td_error_mean", "charts/per_expert_fraction",
                "losses/demo_loss", "losses/qf1_loss", "eval/success_rate"):
        assert tag in scalars and all(np.isfinite(v) for _, v in scalars[tag]), tag
    betas = [v for _, v in sorted(scalars["charts/per_beta"])]
    assert betas[0] >= 0.4 and betas == sorted(betas) and betas[-1] == pytest.approx(1.0)
    assert all(0 < v <= 1 for _, v in scalars["losses/is_weight_mean"])
    steps = [step for step, _ in scalars["charts/gradient_steps"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60
