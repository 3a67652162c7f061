"""rpo_mujoco.py: a tiny real training run, saved normalisation statistics, truncation bootstrapping, start-up errors.

The training run is shared by several tests (module fixture) to keep the file fast on a small CPU.
"""

import os
import re
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import fails_with, load_script, only_run_dir, read_scalars, run_script, script_fails_with

from cleanrl_equi.envs import mujoco
from cleanrl_equi.checkpoints import save_checkpoint

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


def eval_lines(stdout: str) -> list[tuple[int, str, int]]:
    """The per-episode evaluation lines the script prints: (episode, return as printed, length)."""
    return [(int(i), r, int(n)) for i, r, n in re.findall(r"eval episode (\d+): return (\S+), length (\d+)", stdout)]


@pytest.fixture(scope="module")
def rpo():
    """The script as a module: its helpers are importable, its training code sits under `if __name__ == ...`."""
    return load_script("rpo_mujoco")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny Hopper-v5 training run with --save-model (which saves and then evaluates the in-memory agent).

    Under pytest-xdist every worker would build its own module fixture; the run is made once, under a file lock in
    the directory the workers share, and the others reuse it.
    """
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    cwd = shared / "rpo_mujoco_trained"
    with FileLock(str(shared / "rpo_mujoco_trained.lock")):
        if not (cwd / "stdout.txt").exists():
            cwd.mkdir(exist_ok=True)
            proc = run_script(SCRIPT, *TINY, "--seed", str(SEED), "--save-model", "--eval-episodes",
                              str(EVAL_EPISODES), cwd=str(cwd))
            (cwd / "stdout.txt").write_text(proc.stdout)
    run_dir = only_run_dir(str(cwd))
    model = os.path.join(run_dir, "rpo_mujoco.cleanrl_model")
    return {"cwd": str(cwd), "run_dir": run_dir, "stdout": (cwd / "stdout.txt").read_text(), "model": model}


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
    assert "step 1024/1024 | SPS" in trained["stdout"]


def test_saved_policy_evaluates_like_the_in_memory_agent(trained):
    in_memory = eval_lines(trained["stdout"])
    assert len(in_memory) == EVAL_EPISODES
    proc = run_script(SCRIPT, "--eval-checkpoint", trained["model"], "--eval-episodes", str(EVAL_EPISODES),
                      "--seed", str(SEED), cwd=trained["cwd"])
    assert eval_lines(proc.stdout) == in_memory
    assert f"eval mean return over {EVAL_EPISODES} episodes" in proc.stdout
    # the resume file: the same weights, and the sub-envs' statistics merged as --save-model merges them
    resumable = run_script(SCRIPT, "--eval-checkpoint", os.path.join(trained["run_dir"], "resume.pt"),
                           "--eval-episodes", str(EVAL_EPISODES), "--seed", str(SEED), cwd=trained["cwd"])
    assert eval_lines(resumable.stdout) == in_memory
    assert f"evaluation seed {SEED + 10_000})" in resumable.stdout  # the evaluation scenes, as the other scripts say
    logged = [value for _, value in sorted(read_scalars(trained["run_dir"])["eval/episodic_return"])]
    np.testing.assert_allclose(logged, [float(r) for _, r, _ in in_memory], rtol=1e-6)


def test_checkpoint_restores_and_freezes_the_statistics(trained, rpo):
    agent, statistics, saved_args = rpo.load_policy(trained["model"], "cpu")
    obs_rms = statistics["obs_rms"]
    # A trained normaliser has seen 1024 observations and differs from the fresh one (mean 0, var 1).
    assert obs_rms["count"] > 1024 and not np.allclose(obs_rms["var"], 1.0)
    assert statistics["return_rms"]["count"] > 1024

    envs = gym.vector.SyncVectorEnv([rpo.make_env("Hopper-v5", 0, False, "", 0.99)])
    mujoco.restore_statistics(envs.envs[0], statistics)
    obs_norm, reward_norm = mujoco.normalizers(envs.envs[0])
    np.testing.assert_allclose(obs_norm.obs_rms.mean, obs_rms["mean"], rtol=1e-6)
    np.testing.assert_allclose(obs_norm.obs_rms.var, obs_rms["var"], rtol=1e-6)
    assert not obs_norm.update_running_mean and not reward_norm.update_running_mean
    envs.reset(seed=0)
    for _ in range(20):
        envs.step(envs.action_space.sample())
    np.testing.assert_allclose(obs_norm.obs_rms.mean, obs_rms["mean"], rtol=1e-6)  # frozen: stepping changes nothing
    assert reward_norm.return_rms.count == statistics["return_rms"]["count"]
    envs.close()

    restored, _ = rpo.evaluate(agent, "Hopper-v5", statistics, EVAL_EPISODES, SEED + 10_000, 0.99, "cpu")
    np.testing.assert_allclose(restored, [float(r) for _, r, _ in eval_lines(trained["stdout"])], rtol=1e-6)
    # The same policy behind a fresh normaliser acts differently: evaluation is sensitive to the restoration.
    dim = len(obs_rms["mean"])
    fresh = {"obs_rms": {"mean": np.zeros(dim), "var": np.ones(dim), "count": 1e-4},
             "return_rms": {"mean": 0.0, "var": 1.0, "count": 1e-4}}
    unrestored, _ = rpo.evaluate(agent, "Hopper-v5", fresh, EVAL_EPISODES, SEED + 10_000, 0.99, "cpu")
    assert not np.allclose(unrestored, restored)


def test_statistics_of_several_envs_merge_like_one_tracker_over_all_data(rpo):
    from gymnasium.wrappers.utils import RunningMeanStd

    rng = np.random.default_rng(0)
    parts = [rng.normal(i, 1 + i, size=(50 + 30 * i, 4)) for i in range(3)]
    trackers, everything = [], RunningMeanStd(shape=(4,))
    for part in parts:
        tracker = RunningMeanStd(shape=(4,))
        tracker.update(part)
        trackers.append(tracker)
    everything.update(np.concatenate(parts))
    merged = mujoco.merged_statistics(trackers)
    np.testing.assert_allclose(merged["mean"], everything.mean, rtol=1e-5)  # up to the 1e-4 prior counts
    np.testing.assert_allclose(merged["var"], everything.var, rtol=1e-5)
    assert merged["count"] == pytest.approx(everything.count + 2e-4)  # each tracker starts with a count of 1e-4


def test_time_limit_cut_bootstraps_from_the_final_observation(rpo):
    torch.manual_seed(0)
    agent = rpo.Agent(17, 6, rpo_alpha=0.5)
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("HalfCheetah-v5", max_episode_steps=3),
         lambda: gym.make("HalfCheetah-v5", max_episode_steps=5)],
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

    save_checkpoint(path, "rpo_mujoco", Args(), model={})


def write_corrupt_file(path):
    with open(path, "w") as f:
        f.write("not a checkpoint")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"env_id": "HalfCheeta-v5"}, "unknown env id 'HalfCheeta-v5'"),
        ({"env_id": "BreakoutNoFrameskip-v4"}, "use ppo_atari.py"),
        ({"env_id": "PongNoFrameskip-v4"}, "use ppo_atari.py"),
        ({"env_id": "Pong-v4"}, "use ppo_atari.py"),
        ({"env_id": "CartPole-v1"}, "not a MuJoCo continuous-control task"),
        ({"env_id": "Pendulum-v1"}, "not a MuJoCo continuous-control task"),
        ({"env_id": "Hopper-v3"}, "use Hopper-v5"),
        ({"num_minibatches": 30}, "choose a number of minibatches that divides 2048"),
        ({"num_steps": 64, "total_timesteps": 32}, "less than one rollout of 64 steps"),
        ({"rpo_alpha": -0.1}, "--rpo-alpha must not be negative"),
        ({"eval_episodes": 0}, "--eval-episodes must be at least 1"),
    ],
)
def test_bad_flags_stop_with_one_sentence(rpo, capsys, flags, expected):
    fails_with(capsys, [expected], rpo.check_args, rpo.Args(**flags))


@pytest.mark.parametrize(
    "setup, expected",
    [
        (None, "does not exist"),
        (write_foreign_checkpoint, "written by ppo_atari.py"),
        (write_incomplete_checkpoint, "holds no normalisation statistics"),
        (write_corrupt_file, "corrupt"),
    ],
    ids=["missing", "foreign", "incomplete", "corrupt"],
)
def test_unusable_checkpoints_stop_with_one_sentence(rpo, capsys, tmp_path, setup, expected):
    path = str(tmp_path / "checkpoint.cleanrl_model")
    if setup is not None:
        setup(path)
    fails_with(capsys, [expected], rpo.load_policy, path, "cpu")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--env-id", "ALE/Pong-v5"], "ALE/Pong-v5 is an Atari game and this script trains MuJoCo tasks; use ppo_"),
        (["--eval-checkpoint", "nowhere.cleanrl_model"], "does not exist; pass the path of a file written with --save"),
    ],
    ids=["atari", "missing-checkpoint"],
)
def test_the_script_itself_stops_before_creating_a_run(workdir, flags, expected):
    proc = run_script(SCRIPT, *flags, cwd=workdir, check=False)
    script_fails_with(proc, expected)
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
    run_script(SCRIPT, "--env-id", "Hopper-v5", "--num-steps", "64", "--total-timesteps", "64", "--num-minibatches",
               "2", "--update-epochs", "1", "--capture-video", "--save-model", "--eval-episodes", "1", cwd=workdir)
    run_name = os.path.basename(only_run_dir(workdir))
    train_videos = os.listdir(os.path.join(workdir, "videos", run_name))
    eval_videos = os.listdir(os.path.join(workdir, "videos", f"{run_name}-eval"))
    assert any(name.endswith(".mp4") for name in train_videos), train_videos
    assert sorted(name for name in eval_videos if name.endswith(".mp4")) == ["rl-video-episode-0.mp4"], eval_videos
