"""The manipulation envs as other libraries use them: copies (deepcopy, pickle, a fresh process), info values of one
type (TorchRL, gymnasium's vector envs, Minari), gym.make's max_episode_steps, a quiet stdout, and the Minari route."""

import copy
import gc
import os
import pickle
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.registration import EnvSpec

import cleanrl_equi
from cleanrl_equi.envs.manipulation.metrics import EPISODE_METRICS, STEP_METRICS
from conftest import REPO

TASKS = cleanrl_equi.MANIPULATION_TASKS


def make(task, **kwargs):
    return gym.make(f"cleanrl_equi/{task}-v0", **kwargs)


def wrapper_chain(env):
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def assert_same_step(result, expected):
    observation, reward, terminated, truncated, info = result
    np.testing.assert_array_equal(observation, expected[0])
    assert (reward, terminated, truncated) == tuple(expected[1:4])
    assert info.keys() == expected[4].keys()
    for key, value in info.items():
        assert type(value) is type(expected[4][key]) and np.array_equal(value, expected[4][key]), key


# ---- copies ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_copies_rebuild_the_episode_and_step_identically(task):
    """A deepcopy and an unpickled copy of the wrapped env, taken mid-episode: own pybullet connection, the same
    scene, step count and RNG state, and then the same observations, rewards and infos as the original. The bowl's
    and the corner's compound shapes are the case a scene-state copy gets wrong by 1e-8 m (contact caches)."""
    env = make(task, image_size=32)
    env.reset(seed=3)
    for _ in range(6):
        env.step(env.unwrapped.expert_action())
    copies = [copy.deepcopy(env), pickle.loads(pickle.dumps(env))]
    original = env.unwrapped
    for twin in copies:
        assert [type(w) for w in wrapper_chain(twin)] == [type(w) for w in wrapper_chain(env)]
        assert twin.unwrapped.sim._client != original.sim._client
        assert twin.unwrapped.get_scene_state() == original.get_scene_state()
        assert twin.unwrapped.np_random.bit_generator.state == original.np_random.bit_generator.state
    for _ in range(10):
        action = original.expert_action()
        expected = env.step(action)
        for twin in copies:
            assert_same_step(twin.step(action), expected)
    for twin in copies:
        twin.close()
    env.close()


def test_a_copy_is_independent_of_the_original():
    env = make("BlockPicking", image_size=32)
    env.reset(seed=0)
    twin = copy.deepcopy(env)
    position, yaw = env.unwrapped.gripper_pose()
    twin.step(np.array([1, 1, 1, -1, 1], np.float32))
    moved, _ = twin.unwrapped.gripper_pose()
    assert np.array_equal(env.unwrapped.gripper_pose()[0], position) and not np.allclose(moved, position)
    del twin
    gc.collect()  # the copy's connection goes with it; the original's stays
    env.step(np.zeros(5, np.float32))
    env.close()


def test_copies_before_reset_and_after_close_keep_the_rng():
    fresh = make("BlockStacking", image_size=32)
    fresh.unwrapped.np_random  # seeds from entropy: a copy must continue the same stream
    twin = copy.deepcopy(fresh)
    np.testing.assert_array_equal(twin.reset()[0], fresh.reset()[0])
    fresh.close()
    closed = pickle.loads(pickle.dumps(fresh))
    assert closed.unwrapped.sim is None
    np.testing.assert_array_equal(closed.reset()[0], fresh.reset()[0])
    for env in (fresh, twin, closed):
        env.close()


def test_an_unpickled_env_steps_identically_in_a_fresh_process(tmp_path):
    env = make("BlockInBowl", image_size=32)
    env.reset(seed=8)
    for _ in range(5):
        env.step(env.unwrapped.expert_action())
    actions = np.random.default_rng(0).uniform(-1, 1, (8, 5)).astype(np.float32)
    (tmp_path / "env.pkl").write_bytes(pickle.dumps(env))
    np.save(tmp_path / "actions.npy", actions)
    code = ("import pickle, sys, numpy as np\n"
            "env = pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "out = [env.step(a) for a in np.load(sys.argv[2])]\n"
            "np.savez(sys.argv[3], obs=np.stack([o[0] for o in out]), rest=np.array([o[1:4] for o in out]), "
            "success=[o[4]['is_success'] for o in out], holding=[o[4]['holding'] for o in out], "
            "steps=env.unwrapped.steps)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "env.pkl"), str(tmp_path / "actions.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # and not one pybullet line
    expected = [env.step(a) for a in actions]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["obs"], np.stack([e[0] for e in expected]))
        np.testing.assert_array_equal(out["rest"], np.array([e[1:4] for e in expected]))
        np.testing.assert_array_equal(out["success"], [e[4]["is_success"] for e in expected])
        np.testing.assert_array_equal(out["holding"], [e[4]["holding"] for e in expected])
        assert int(out["steps"]) == env.unwrapped.steps == 13
    env.close()


def test_a_scene_changed_outside_reset_and_step_is_not_copied():
    """An edit between steps is not in the replayed episode, and velocities and contact caches cannot be carried
    otherwise: the copy is refused in one sentence instead of being silently different."""
    env = make("BlockPicking", image_size=32).unwrapped
    env.reset(seed=0)
    env.step(np.zeros(5, np.float32))
    env.set_body_pose(env.cube, (0.05, 0.05, 0.025))
    with pytest.raises(RuntimeError) as error:
        copy.deepcopy(env)
    message = str(error.value)
    assert "outside reset() and step()" in message and "scene_state" in message
    assert message.endswith(".") and "\n" not in message and message.count(". ") == 0
    env.step(np.zeros(5, np.float32))  # the original is untouched
    env.close()


# ---- info values -------------------------------------------------------------------------------------------------
def kinds(info):
    return {key: (type(value), getattr(value, "dtype", None), getattr(value, "shape", None))
            for key, value in info.items()}


@pytest.mark.parametrize("task", TASKS)
def test_info_values_have_one_type_at_reset_and_every_step(task):
    """0-d arrays (bools for the flags, floats for the metrics): a `.dtype` for TorchRL's info reader, the same type
    at reset and step for Minari."""
    env = make(task, image_size=32)
    _, info = env.reset(seed=11)
    reference = kinds(info)
    assert reference == {**{key: (np.ndarray, np.dtype(bool), ()) for key in ("is_success", "holding")},
                         **{key: (np.ndarray, np.dtype(float), ()) for key in EPISODE_METRICS + STEP_METRICS}}
    for _ in range(50):
        _, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
        assert kinds(info) == reference
        if terminated or truncated:
            break
    assert info["is_success"] and torch.as_tensor(info["is_success"]).dtype == torch.bool
    env.close()


def test_vector_envs_stack_infos_into_bool_arrays():
    envs = gym.vector.SyncVectorEnv([lambda: make("BlockPicking", image_size=32) for _ in range(2)])
    _, infos = envs.reset(seed=0)
    assert infos["is_success"].dtype == bool and infos["holding"].dtype == bool
    _, _, _, _, infos = envs.step(np.zeros((2, 5), np.float32))
    assert infos["is_success"].dtype == bool and infos["holding"].shape == (2,)
    envs.close()


# ---- gym.make's max_episode_steps ------------------------------------------------------------------------------
def test_max_episode_steps_of_gym_make_is_the_envs_limit():
    env = make("BlockPicking", image_size=16, max_episode_steps=100)
    assert env.unwrapped.max_steps == 100 and env.spec.max_episode_steps == 100
    assert not any(isinstance(w, gym.wrappers.TimeLimit) for w in wrapper_chain(env))  # truncated in the env only
    env.reset(seed=0)
    truncations = [env.step(np.zeros(5, np.float32))[3] for _ in range(100)]
    assert truncations == [False] * 99 + [True]
    env.close()


def test_the_default_and_the_max_steps_kwarg_are_reported_by_the_spec():
    default = make("BlockPicking", image_size=16)
    assert default.unwrapped.max_steps == 50 and default.spec.max_episode_steps == 50
    assert not any(isinstance(w, gym.wrappers.TimeLimit) for w in wrapper_chain(default))
    assert make("BlockPicking", max_steps=7).spec.max_episode_steps == 7
    assert make("BlockPicking", max_steps=7, max_episode_steps=7).unwrapped.max_steps == 7


def test_disagreeing_limits_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="max_episode_steps=100 and max_steps=80") as error:
        make("BlockPicking", max_episode_steps=100, max_steps=80)
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message


def test_the_spec_rebuilds_the_same_limit():
    """gym.make(env.spec), also through JSON (Minari stores the spec so), keeps the limit without a TimeLimit."""
    env = make("BlockPicking", image_size=16, max_episode_steps=7)
    for spec in (env.spec, EnvSpec.from_json(env.spec.to_json())):
        remade = gym.make(spec)
        assert remade.unwrapped.max_steps == 7 and remade.spec.max_episode_steps == 7
        assert not any(isinstance(w, gym.wrappers.TimeLimit) for w in wrapper_chain(remade))
        assert remade.unwrapped.image_size == 16


def test_make_vec_passes_max_episode_steps_to_each_env():
    envs = gym.make_vec("cleanrl_equi/BlockPicking-v0", num_envs=2, max_episode_steps=7, image_size=16)
    assert envs.get_attr("max_steps") == (7, 7)
    envs.close()


# ---- stdout ------------------------------------------------------------------------------------------------------
def test_envs_print_nothing_to_stdout():
    """What reaches file descriptor 1 of a process that makes, resets, steps, renders and closes envs (a pipe, so
    C stdio buffers it): only the script's own output, in order."""
    code = ("import os, numpy as np, gymnasium as gym, cleanrl_equi\n"
            "print('before', flush=True)\n"
            "for task in ('BlockPicking', 'DrawerOpening'):\n"
            "    env = gym.make(f'cleanrl_equi/{task}-v0', image_size=16, render_mode='rgb_array')\n"
            "    env.reset(seed=0)\n"
            "    env.step(np.zeros(5, np.float32))\n"
            "    env.render()\n"
            "    env.close()\n"
            "os.write(1, b'raw\\n')\n"
            "print('after')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "before\nraw\nafter\n"


def test_stdout_is_restored_when_connecting_fails(monkeypatch):
    from cleanrl_equi.envs.manipulation import scene

    def broken_client(**kwargs):
        raise RuntimeError("no physics server")

    monkeypatch.setattr(scene, "BulletClient", broken_client)
    before = os.fstat(1)
    open_fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(RuntimeError, match="no physics server"):
        scene.connect_quietly()
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    if open_fds is not None:
        assert len(os.listdir("/proc/self/fd")) == open_fds


# ---- Minari ------------------------------------------------------------------------------------------------------
def test_minari_hdf5_keeps_per_step_and_whole_episode_observations_exactly(tmp_path):
    """Minari's HDF5 storage keeps the (2, H, W) uint8 observations exactly, whether buffered step by step (what
    DataCollector does; Minari 0.5.3 JPEG-encoded these and failed) or as one (T+1, 2, H, W) array per episode (what
    `cleanrl_equi.datasets.to_minari` hands over)."""
    pytest.importorskip("minari", reason="install the `minari` extra: uv sync --extra minari")
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    env = make("BlockPicking", image_size=32)
    observations = [env.reset(seed=0)[0]]
    actions = []
    for _ in range(3):
        actions.append(env.unwrapped.expert_action())
        observations.append(env.step(actions[-1])[0])

    def episode(obs):
        return EpisodeBuffer(id=0, seed=0, observations=obs, actions=np.stack(actions), rewards=[0.0] * 3,
                             terminations=[False] * 3, truncations=[False, False, True])

    per_step = MinariStorage.new(str(tmp_path / "per_step"), observation_space=env.observation_space,
                                 action_space=env.action_space, data_format="hdf5")
    per_step.update_episodes([episode(observations)])
    np.testing.assert_array_equal(next(iter(per_step.get_episodes([0])))["observations"], np.stack(observations))
    whole = MinariStorage.new(str(tmp_path / "whole"), observation_space=env.observation_space,
                              action_space=env.action_space, data_format="hdf5")
    whole.update_episodes([episode(np.stack(observations))])
    stored = next(iter(whole.get_episodes([0])))
    np.testing.assert_array_equal(stored["observations"], np.stack(observations))
    env.close()
