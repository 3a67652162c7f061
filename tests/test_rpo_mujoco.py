"""rpo_mujoco.py: a tiny real training run, the saved normalisation statistics, truncation bootstrapping, start-up errors.

The training run is shared by several tests (module fixture) to keep the file fast on a small CPU.
"""

import importlib.util
import os
import re
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import REPO, only_run_dir, read_scalars, run_script

from cleanrl_equi.utils import save_checkpoint

SCRIPT = "rpo_mujoco.py"
# Hopper: a random policy falls within ~20-60 steps, so even 1024 steps finish many episodes.
TINY = ["--env-id", "Hopper-v5", "--num-steps", "256", "--total-timesteps", "1024", "--num-minibatches", "4",
        "--update-epochs", "2"]
EVAL_EPISODES = 3
SEED = 3

CLEANRL_SCALARS = [
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate", "losses/value_loss",
    "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac",
    "losses/explained_variance",
]


def load_rpo_module():
    """Import rpo_mujoco.py as a module (its training code sits under `if __name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location("rpo_mujoco", os.path.join(REPO, SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_lines(stdout: str) -> list[tuple[int, str, int]]:
    """The per-episode evaluation lines the script prints: (episode, return as printed, length)."""
    return [(int(i), r, int(n)) for i, r, n in re.findall(r"eval episode (\d+): return (\S+), length (\d+)", stdout)]


@pytest.fixture(scope="module")
def rpo():
    return load_rpo_module()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny Hopper-v5 training run with --save-model (which saves and then evaluates the in-memory agent)."""
    cwd = str(tmp_path_factory.mktemp("rpo_train"))
    proc = run_script(SCRIPT, *TINY, "--seed", str(SEED), "--save-model", "--eval-episodes", str(EVAL_EPISODES), cwd=cwd)
    run_dir = only_run_dir(cwd)
    return {"cwd": cwd, "run_dir": run_dir, "stdout": proc.stdout, "model": os.path.join(run_dir, "rpo_mujoco.cleanrl_model")}


def test_training_writes_cleanrl_scalars(trained):
    assert os.path.basename(trained["run_dir"]).startswith(f"Hopper-v5__rpo_mujoco__{SEED}__")
    scalars = read_scalars(trained["run_dir"])
    for tag in CLEANRL_SCALARS:
        assert scalars.get(tag), f"missing scalar {tag}"
    iterations = 1024 // 256
    assert [step for step, _ in scalars["charts/SPS"]] == [256 * (i + 1) for i in range(iterations)]
    learning_rates = [value for _, value in scalars["charts/learning_rate"]]
    assert learning_rates[0] == pytest.approx(3e-4) and learning_rates == sorted(learning_rates, reverse=True)
    returns = [value for _, value in scalars["charts/episodic_return"]]
    assert len(returns) >= 5 and all(np.isfinite(returns))
    assert len(scalars["eval/episodic_return"]) == EVAL_EPISODES
    assert os.path.isfile(trained["model"])
    assert "global_step=1024/1024 (100%)" in trained["stdout"]


def test_saved_policy_evaluates_like_the_in_memory_agent(trained):
    in_memory = eval_lines(trained["stdout"])
    assert len(in_memory) == EVAL_EPISODES
    proc = run_script(SCRIPT, "--eval-checkpoint", trained["model"], "--eval-episodes", str(EVAL_EPISODES),
                      "--seed", str(SEED), cwd=trained["cwd"])
    assert eval_lines(proc.stdout) == in_memory
    assert f"eval mean return over {EVAL_EPISODES} episodes" in proc.stdout
    logged = [value for _, value in sorted(read_scalars(trained["run_dir"])["eval/episodic_return"])]
    np.testing.assert_allclose(logged, [float(r) for _, r, _ in in_memory], rtol=1e-6)


def test_checkpoint_restores_and_freezes_the_statistics(trained, rpo):
    agent, statistics, saved_args = rpo.load_policy(trained["model"], "cpu")
    obs_rms = statistics["obs_rms"]
    # A trained normaliser has seen 1024 observations and differs from the fresh one (mean 0, var 1).
    assert obs_rms["count"] > 1024 and not np.allclose(obs_rms["var"], 1.0)
    assert statistics["return_rms"]["count"] > 1024

    envs = gym.vector.SyncVectorEnv([rpo.make_env("Hopper-v5", 0, False, "", 0.99)])
    rpo.restore_statistics(envs.envs[0], statistics)
    obs_norm, reward_norm = rpo.normalizers(envs.envs[0])
    np.testing.assert_allclose(obs_norm.obs_rms.mean, obs_rms["mean"], rtol=1e-6)
    np.testing.assert_allclose(obs_norm.obs_rms.var, obs_rms["var"], rtol=1e-6)
    assert not obs_norm.update_running_mean and not reward_norm.update_running_mean
    envs.reset(seed=0)
    for _ in range(20):
        envs.step(envs.action_space.sample())
    np.testing.assert_allclose(obs_norm.obs_rms.mean, obs_rms["mean"], rtol=1e-6)  # frozen: stepping changes nothing
    assert reward_norm.return_rms.count == statistics["return_rms"]["count"]
    envs.close()

    restored, _ = rpo.evaluate(agent, "Hopper-v5", statistics, EVAL_EPISODES, SEED, 0.99, "cpu")
    np.testing.assert_allclose(restored, [float(r) for _, r, _ in eval_lines(trained["stdout"])], rtol=1e-6)
    # The same policy behind a fresh normaliser acts differently: evaluation is sensitive to the restoration.
    dim = len(obs_rms["mean"])
    fresh = {"obs_rms": {"mean": np.zeros(dim), "var": np.ones(dim), "count": 1e-4},
             "return_rms": {"mean": 0.0, "var": 1.0, "count": 1e-4}}
    unrestored, _ = rpo.evaluate(agent, "Hopper-v5", fresh, EVAL_EPISODES, SEED, 0.99, "cpu")
    assert not np.allclose(unrestored, restored)


def test_time_limit_cut_bootstraps_from_the_final_observation(rpo):
    torch.manual_seed(0)
    agent = rpo.Agent(17, 6, rpo_alpha=0.5)
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("HalfCheetah-v5", max_episode_steps=3), lambda: gym.make("HalfCheetah-v5", max_episode_steps=5)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs.reset(seed=0)
    for _ in range(3):
        obs, _, terminations, truncations, infos = envs.step(envs.action_space.sample())
    assert list(truncations) == [True, False] and not terminations.any()
    bonus = rpo.truncation_bootstrap(agent, infos, terminations, truncations, 0.99, "cpu")
    final_obs = torch.as_tensor(infos["final_obs"][0], dtype=torch.float32)
    with torch.no_grad():
        expected = 0.99 * agent.get_value(final_obs[None]).item()
        value_of_reset_obs = agent.get_value(torch.as_tensor(obs[:1], dtype=torch.float32)).item()
    assert bonus[0] == pytest.approx(expected, rel=1e-6) and bonus[0] != pytest.approx(0.99 * value_of_reset_obs)
    assert bonus[1] == 0.0
    # An env that terminated in the same step has no future to bootstrap from.
    both = rpo.truncation_bootstrap(agent, infos, np.array([True, False]), truncations, 0.99, "cpu")
    assert (both == 0).all()
    envs.close()


def write_foreign_checkpoint(path):
    class Args:  # save_checkpoint stores vars(args)
        env_id = "BreakoutNoFrameskip-v4"

    save_checkpoint(path, "ppo_atari.py", Args())


def write_incomplete_checkpoint(path):
    class Args:
        env_id = "Hopper-v5"

    save_checkpoint(path, SCRIPT, Args(), model={})


def write_corrupt_file(path):
    with open(path, "w") as f:
        f.write("not a checkpoint")


@pytest.mark.parametrize(
    "flags, setup, expected",
    [
        (["--env-id", "HalfCheeta-v5"], None, "unknown env id 'HalfCheeta-v5'"),
        (["--env-id", "BreakoutNoFrameskip-v4"], None, "use ppo_atari.py"),
        (["--env-id", "ALE/Pong-v5"], None, "use ppo_atari.py"),
        (["--env-id", "CartPole-v1"], None, "not a MuJoCo continuous-control task"),
        (["--env-id", "Hopper-v3"], None, "use Hopper-v5"),
        (["--num-minibatches", "30"], None, "choose a number of minibatches that divides 2048"),
        (["--eval-checkpoint", "missing.cleanrl_model"], None, "does not exist"),
        (["--eval-checkpoint", "ckpt"], write_foreign_checkpoint, "written by ppo_atari.py"),
        (["--eval-checkpoint", "ckpt"], write_incomplete_checkpoint, "lacks obs_rms"),
        (["--eval-checkpoint", "ckpt"], write_corrupt_file, "corrupt"),
    ],
    ids=["typo", "atari-v4", "atari-ale", "cartpole", "mujoco-py", "minibatches", "missing-ckpt", "foreign-ckpt",
         "incomplete-ckpt", "corrupt-ckpt"],
)
def test_start_up_errors_are_one_sentence(workdir, flags, setup, expected):
    if setup is not None:
        setup(os.path.join(workdir, "ckpt"))
    proc = run_script(SCRIPT, *flags, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "runs")), "a failed start must not create a run"


def rendering_works() -> bool:
    env = dict(os.environ)
    code = "import gymnasium as gym; e = gym.make('Hopper-v5', render_mode='rgb_array'); e.reset(seed=0); e.render()"
    if sys.platform.startswith("linux") and not env.get("DISPLAY"):
        env.setdefault("MUJOCO_GL", "egl")
    import subprocess

    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


@pytest.mark.skipif(not rendering_works(), reason="no OpenGL backend for MuJoCo here (EGL needs libegl1)")
def test_capture_video_writes_training_and_evaluation_videos(workdir):
    run_script(SCRIPT, "--env-id", "Hopper-v5", "--num-steps", "256", "--total-timesteps", "256", "--num-minibatches",
               "4", "--update-epochs", "1", "--capture-video", "--save-model", "--eval-episodes", "1", cwd=workdir)
    run_name = os.path.basename(only_run_dir(workdir))
    train_videos = os.listdir(os.path.join(workdir, "videos", run_name))
    eval_videos = os.listdir(os.path.join(workdir, "videos", f"{run_name}-eval"))
    assert any(name.endswith(".mp4") for name in train_videos), train_videos
    assert [name for name in eval_videos if name.endswith(".mp4")], eval_videos
