"""The manipulation task suite: gymnasium API, conventions, the rotation symmetry, planners, determinism, errors."""

import math
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import cleanrl_equi
from cleanrl_equi.envs.manipulation.scene import HEIGHT_UNIT, rotate_scene_state
from cleanrl_equi.envs.manipulation.tasks import PAPER_TASK_KWARGS
from conftest import QUARTER_TURN

TASKS = cleanrl_equi.MANIPULATION_TASKS


def make(task, **kwargs):
    return gym.make(f"cleanrl_equi/{task}-v0", **kwargs)


def test_tasks_are_registered_without_importing_pybullet():
    code = ("import sys, gymnasium as gym, cleanrl_equi; "
            "ids = [f'cleanrl_equi/{n}-v0' for n in cleanrl_equi.MANIPULATION_TASKS]; "
            "assert all(i in gym.registry for i in ids), ids; "
            "assert 'pybullet' not in sys.modules; print(len(ids))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "8"


@pytest.mark.parametrize("task", TASKS)
def test_check_env(task):
    env = make(task, image_size=32, render_mode="rgb_array")
    check_env(env.unwrapped)
    observation, info = env.reset(seed=0)
    assert observation.shape == (2, 32, 32) and observation.dtype == np.uint8
    assert info["is_success"].dtype == bool and info["is_success"].shape == () and not info["is_success"]
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8 and frame.std() > 0
    env.close()


def expert_rollout_states(task, seed, steps, image_size=128):
    """Scene states along an expert episode (the reset state first)."""
    env = make(task, image_size=image_size).unwrapped
    env.reset(seed=seed)
    states = [env.get_scene_state()]
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.expert_action())
        if terminated or truncated:
            break
        states.append(env.get_scene_state())
    env.close()
    return states


@pytest.mark.parametrize("task", TASKS)
def test_rotating_the_scene_rotates_image_and_expert(task):
    """Turning every object and the gripper by k * 90 degrees about the gripper axis turns channel 0 by
    np.rot90(k) and the expert's (dx, dy) by the same rotation; p, dz, dtheta and the holding flag stay."""
    env = make(task).unwrapped  # the default 128 x 128 observation, really rendered
    for state in expert_rollout_states(task, seed=3, steps=6)[::2]:
        observation, _ = env.reset(options={"scene_state": state})
        action = env.expert_action()
        for k in (1, 2, 3):
            rotated_observation, _ = env.reset(options={"scene_state": rotate_scene_state(state, k)})
            rotated_action = env.expert_action()
            differing = np.abs(np.rot90(observation[0], k).astype(int) - rotated_observation[0]) > 1
            assert differing.mean() < 0.001, f"{task}: {differing.sum()} pixels differ after {k} quarter turns"
            np.testing.assert_array_equal(rotated_observation[1], observation[1])
            rotation = np.linalg.matrix_power(QUARTER_TURN, k)
            np.testing.assert_allclose(rotated_action[1:3], rotation @ action[1:3], atol=1e-4)
            np.testing.assert_allclose(rotated_action[[0, 3, 4]], action[[0, 3, 4]], atol=1e-4)
    env.close()


def test_rotation_with_the_tiny_renderer_within_tolerance():
    """The pybullet CPU renderer obeys the same convention (up to rasterisation at edges)."""
    env = make("HouseBuilding", renderer="tiny").unwrapped
    state = expert_rollout_states("HouseBuilding", seed=1, steps=4)[-1]
    observation, _ = env.reset(options={"scene_state": state})
    rotated_observation, _ = env.reset(options={"scene_state": rotate_scene_state(state, 1)})
    differing = np.abs(np.rot90(observation[0]).astype(int) - rotated_observation[0]) > 2
    assert differing.mean() < 0.02
    env.close()


def test_image_axes_heights_and_fingers():
    """Rows grow with +x, columns with +y, values are millimetres, the fingers show opening and height."""
    env = make("BlockPicking").unwrapped
    env.reset(seed=0)
    state = env.get_scene_state()
    state["gripper"].update(position=[0.0, 0.0, 0.12], yaw=0.0, fingers=[0.04, 0.04])
    state["bodies"][0].update(position=[0.07, 0.0, 0.025], orientation=[0, 0, 0, 1])  # a cube 7 cm along +x
    observation, info = env.reset(options={"scene_state": state})
    pixel = env.pixel_size
    centre = 64
    row = centre + int(0.07 / pixel)
    assert observation[0, row, centre] == round(0.05 / HEIGHT_UNIT)  # the cube's top, 50 mm
    assert observation[0, centre - int(0.07 / pixel), centre] == 0  # nothing along -x
    state["bodies"][0]["position"] = [0.0, 0.07, 0.025]  # now along +y
    observation, _ = env.reset(options={"scene_state": state})
    assert observation[0, centre, centre + int(0.07 / pixel)] == 50
    # At yaw 0 the fingers close along y: two patches at +-(4 cm + half a finger) on the centre row, at 120 mm.
    finger_offset = int(0.045 / pixel)
    assert observation[0, centre, centre + finger_offset] == 120 and observation[0, centre, centre - finger_offset] == 120
    assert observation[0, centre, centre] == 0 and not info["holding"] and observation[1].max() == 0
    # Turning the gripper by 90 degrees moves the fingers onto the centre column.
    state["gripper"]["yaw"] = math.pi / 2
    observation, _ = env.reset(options={"scene_state": state})
    assert observation[0, centre + finger_offset, centre] == 120 and observation[0, centre, centre + finger_offset] == 0
    env.close()


@pytest.mark.parametrize("task", TASKS)
def test_expert_solves_seeded_episodes(task):
    env = make(task, image_size=32)
    for seed in (11, 12, 13):
        env.reset(seed=seed)
        for step in range(1, 51):
            action = env.unwrapped.expert_action()
            assert action.shape == (5,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
            _, reward, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        assert info["is_success"] and terminated and not truncated and reward == 1.0, f"{task} seed {seed}"
    env.close()


def test_same_seed_same_episode():
    def episode(env, seed):
        rng = np.random.default_rng(seed)
        observations = [env.reset(seed=seed)[0]]
        for _ in range(8):
            observations.append(env.step(rng.uniform(-1, 1, 5).astype(np.float32))[0])
        return np.stack(observations)

    first, second = make("BlockStacking", image_size=32), make("BlockStacking", image_size=32)
    reference = episode(first, 5)
    np.testing.assert_array_equal(reference, episode(second, 5))
    episode(first, 6)  # another episode in between must not leak into the next one
    np.testing.assert_array_equal(reference, episode(first, 5))
    assert not np.array_equal(reference[0], episode(second, 6)[0])


def test_truncation_at_max_steps():
    env = make("BlockPulling", image_size=32, max_steps=3)
    env.reset(seed=0)
    results = [env.step(np.zeros(5, np.float32))[2:4] for _ in range(3)]
    assert results == [(False, False), (False, False), (False, True)]


def test_object_leaving_workspace_ends_episode_with_zero():
    env = make("BlockPicking", image_size=32).unwrapped
    env.reset(seed=0)
    state = env.get_scene_state()
    state["bodies"][0]["position"] = [0.3, 0.0, 0.025]  # outside the 0.3 m square
    env.reset(options={"scene_state": state})
    _, reward, terminated, truncated, info = env.step(np.zeros(5, np.float32))
    assert terminated and not truncated and reward == 0.0 and not info["is_success"]


def test_vector_envs_and_expert_through_call():
    env_fns = [lambda: make("BlockPicking", image_size=32) for _ in range(2)]
    for vector_env in (gym.vector.SyncVectorEnv(env_fns), gym.vector.AsyncVectorEnv(env_fns)):
        observations, _ = vector_env.reset(seed=[0, 1])
        assert observations.shape == (2, 2, 32, 32) and observations.dtype == np.uint8
        actions = vector_env.call("expert_action")
        assert len(actions) == 2 and all(a.shape == (5,) for a in actions)
        observations, _, _, _, infos = vector_env.step(np.stack(actions))
        assert observations.shape == (2, 2, 32, 32) and "is_success" in infos
        vector_env.close()


def test_renderers_agree():
    """TinyRenderer and rayTestBatch give the analytic height map up to edge pixels."""
    state = expert_rollout_states("DrawerOpening", seed=2, steps=5)[-1]
    images = {}
    for renderer in ("analytic", "tiny", "raycast"):
        env = make("DrawerOpening", renderer=renderer).unwrapped
        images[renderer] = env.reset(options={"scene_state": state})[0][0].astype(int)
        env.close()
    for renderer in ("tiny", "raycast"):
        assert (np.abs(images[renderer] - images["analytic"]) > 2).mean() < 0.02, renderer


@pytest.mark.parametrize("kwargs, words", [
    ({"workspace_size": 0.1}, "workspace_size"),
    ({"image_size": 8}, "image_size"),
    ({"dpos": 1.0}, "dpos"),
    ({"drot": 4.0}, "drot"),
    ({"max_steps": 0}, "max_steps"),
    ({"renderer": "opengl"}, "renderer"),
    ({"render_mode": "depth_array"}, "render_mode"),
])
def test_bad_kwargs_fail_with_one_sentence(kwargs, words):
    with pytest.raises(ValueError, match=words) as error:
        make("BlockPicking", **kwargs)
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message


@pytest.mark.parametrize("task, kwargs, words", [
    ("BlockPulling", {"block_size": (0.1, 0.08, 0.05)}, "block_size"),
    ("BlockPulling", {"block_size": 0.1}, "block_size"),
    ("BlockPulling", {"block_mass": 0.0}, "block_mass"),
    ("BlockPicking", {"lift_height": 0.3}, "lift_height"),
    ("CornerPicking", {"cube_size": 0.1}, "cube_size"),
    ("CornerPicking", {"lift_height": "high"}, "lift_height"),
])
def test_bad_task_kwargs_fail_with_one_sentence(task, kwargs, words):
    with pytest.raises(ValueError, match=words) as error:
        make(task, **kwargs)
    assert str(error.value).endswith(".") and "\n" not in str(error.value)


PAPER = {"workspace_size": 0.4, "drot": math.pi / 8, "max_steps": 100}  # the ICLR-2022 paper's env settings


@pytest.mark.parametrize("task", sorted(PAPER_TASK_KWARGS))
def test_paper_task_settings(task):
    """The paper's sizes and thresholds: what the image shows, when success comes, and the symmetry of the expert."""
    env = make(task, image_size=64, **PAPER, **PAPER_TASK_KWARGS[task]).unwrapped
    observation, _ = env.reset(seed=2)
    block_pixels = (0.1 / env.pixel_size) ** 2  # a 10 x 10 cm top, seen at 0.6 m / 64 px
    if task == "BlockPulling":  # two 5 cm high blocks (the fingers read 200 mm, the table 0)
        assert set(np.unique(observation[0])) == {0, 50, 200}
        assert abs((observation[0] == 50).sum() - 2 * block_pixels) < 0.15 * 2 * block_pixels
    if task == "CornerPicking":  # a 5 cm cube on the 1 cm plate: its top at 60 mm, below the 70 mm walls
        assert abs((observation[0] == 60).sum() - block_pixels / 4) < 0.3 * block_pixels / 4
    state = env.get_scene_state()
    action = env.expert_action()
    env.reset(options={"scene_state": rotate_scene_state(state, 1)})
    np.testing.assert_allclose(env.expert_action()[1:3], QUARTER_TURN @ action[1:3], atol=1e-4)
    env.reset(seed=2)
    for _ in range(30):
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        if terminated or truncated:
            break
        if task != "BlockPulling" and env.is_held(env.cube) and env.gripper_pose()[0][2] > 0.08:
            pytest.fail("held above 0.08 m without success")
    assert info["is_success"] and reward == 1.0
    if task != "BlockPulling":  # success as soon as the fingertips pass 0.08 m, not BulletArm's 0.15 / 0.1
        assert 0.08 < env.gripper_pose()[0][2] <= 0.08 + env.dpos + 1e-6
    env.close()


def test_scene_state_from_another_task_is_refused():
    state = expert_rollout_states("BlockStacking", seed=0, steps=0)[0]
    with pytest.raises(ValueError, match="same task"):
        make("BlockPicking", image_size=32).reset(options={"scene_state": state})


DQN_GRID = {"dpos": 0.02, "drot": math.pi / 16}  # dqn_equi_bullet.py's steps


@pytest.mark.parametrize("task", TASKS)
def test_whole_step_planner_stays_on_the_grid_turns_with_the_scene_and_succeeds(task):
    """`expert_action(discrete=True)` on the DQN's grid (dpos 0.02, dtheta pi/16, BulletArm's scene): every action
    is whole steps (dx, dy, dz, dtheta in -1, 0, +1; the fingers open or closed), a scene turned by quarter turns
    gives exactly the turned (dx, dy) and the same rest, and seeded episodes succeed."""
    env = make(task, image_size=32, **DQN_GRID).unwrapped
    env.reset(seed=11)
    for step in range(60):
        state = env.get_scene_state()
        action = env.expert_action(discrete=True)
        assert set(action[1:].tolist()) <= {-1.0, 0.0, 1.0} and abs(action[0]) == 1.0, f"{task}: {action}"
        if step % 3 == 0:
            for k in (1, 2, 3):
                env.reset(options={"scene_state": rotate_scene_state(state, k)})
                turned = env.expert_action(discrete=True)
                np.testing.assert_array_equal(turned[1:3], np.linalg.matrix_power(QUARTER_TURN, k) @ action[1:3])
                np.testing.assert_array_equal(turned[[0, 3, 4]], action[[0, 3, 4]])
            env.reset(options={"scene_state": state})
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    for seed in (11, 12, 13):
        env.reset(seed=seed)
        terminated = truncated = False
        while not (terminated or truncated):
            _, reward, terminated, truncated, info = env.step(env.expert_action(discrete=True))
        assert info["is_success"] and reward == 1.0, f"{task} seed {seed}"
    env.close()
