"""Robot arms carrying the gripper (robots.py): the `robot` env option and its flag, IK moves that land where the
floating gripper would, the image (the arm is not drawn), copies, time limits, env checkers, the joint metrics, and
datasets that refuse another robot."""

import copy
import os
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import tyro

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi import datasets as od
from cleanrl_equi.envs.manipulation import ManipulationEnvArgs
from cleanrl_equi.envs.manipulation.metrics import JOINT_METRICS
from cleanrl_equi.envs.manipulation.scene import rotate_scene_state
from cleanrl_equi.tools import make_dataset as tool
from conftest import fails_with

ARMS = ("kuka", "panda")


def make(task="BlockPicking", robot="kuka", **kwargs):
    settings = ManipulationEnvArgs(env_id=f"cleanrl_equi/{task}-v0", robot=robot, image_size=32)
    return gym.make(settings.env_id, **{**settings.env_kwargs(), **kwargs})


def test_the_robot_flag_reaches_the_env_kwargs():
    args = tyro.cli(ManipulationEnvArgs, args=["--robot", "panda"])
    assert args.robot == "panda" and args.env_kwargs()["robot"] == "panda"
    assert ManipulationEnvArgs().env_kwargs()["robot"] == "floating"
    with pytest.raises(SystemExit):
        tyro.cli(ManipulationEnvArgs, args=["--robot", "ur5"])


def test_bad_robot_settings_are_one_sentence():
    with pytest.raises(ValueError, match="robot must be one of"):
        gym.make("cleanrl_equi/BlockPicking-v0", robot="ur5")
    with pytest.raises(ValueError, match="analytic renderer"):
        gym.make("cleanrl_equi/BlockPicking-v0", robot="kuka", renderer="tiny")


@pytest.mark.parametrize("robot", ARMS)
def test_the_arm_lands_the_gripper_on_the_floating_gripper_target(robot):
    env = make(robot=robot)
    env.reset(seed=0)
    base = env.unwrapped
    for action in ([1, 1, 0, -1, 0], [1, 0, -1, 0, 1], [1, -1, 1, 1, -1], [1, 0, 0, -1, 0]):
        position, yaw = base.gripper_pose()
        target = np.clip(position + np.array(action[1:4]) * base.dpos, base.workspace[:, 0], base.workspace[:, 1])
        env.step(np.array(action, dtype=np.float32))
        new_position, new_yaw = base.gripper_pose()
        assert np.abs(new_position - target).max() < 0.003
        assert abs((new_yaw - yaw - action[4] * base.drot + np.pi / 2) % np.pi - np.pi / 2) < 0.01  # mod pi
    env.close()


@pytest.mark.parametrize("robot", ARMS)
def test_the_planner_succeeds_with_the_arm(robot):
    env = make("BlockPicking", robot=robot)
    env.reset(seed=1)
    for _ in range(30):
        _, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
        if terminated or truncated:
            break
    assert info["is_success"]
    assert float(info["joint_path_length"]) > 0 and float(info["peak_joint_torque"]) > 0
    env.close()


def test_the_arm_is_not_drawn_and_a_turned_scene_turns_the_image():
    """The same scene seen with and without the arm is the same image, and a scene turned about the gripper is the
    turned image: the arm breaks the symmetry of the physics only."""
    floating, arm = make(robot="floating"), make(robot="kuka")
    floating_obs, _ = floating.reset(seed=2)
    arm_obs, _ = arm.reset(seed=2)
    np.testing.assert_array_equal(floating_obs, arm_obs)
    state = arm.unwrapped.get_scene_state()
    for k in (1, 2, 3):
        turned, _ = arm.reset(options={"scene_state": rotate_scene_state(state, k)})
        np.testing.assert_array_equal(turned[0], np.rot90(arm_obs[0], k))
    floating.close()
    arm.close()


def test_copies_and_pickles_continue_exactly():
    env = make("BlockPulling", robot="kuka")
    env.reset(seed=3)
    for _ in range(3):
        env.step(env.unwrapped.expert_action())
    twins = [copy.deepcopy(env), pickle.loads(pickle.dumps(env))]
    action = env.unwrapped.expert_action()
    obs, _, _, _, info = env.step(action)
    for twin in twins:
        twin_obs, _, _, _, twin_info = twin.step(action)
        np.testing.assert_array_equal(twin_obs, obs)
        for key in JOINT_METRICS:
            assert float(twin_info[key]) == float(info[key])
        np.testing.assert_array_equal(twin.unwrapped.arm.joints(), env.unwrapped.arm.joints())
        twin.close()
    env.close()


@pytest.mark.parametrize("task", ["BlockPushing", "DrawerOpening"])
def test_an_episode_after_soft_resets_is_the_episode_of_a_fresh_simulation(task, monkeypatch):
    """An arm's simulation is kept between episodes (only the task's bodies are made again) and rebuilt every
    HARD_RESET_EVERY episodes: either way a seed's episode is the same to the last bit, and a copy made after
    several episodes (which replays in a new simulation) continues exactly. Pushing has a goal marker, the drawer
    a jointed body."""
    from cleanrl_equi.envs.manipulation import scene

    monkeypatch.setattr(scene, "HARD_RESET_EVERY", 2)
    used = make(task)
    for seed in range(4):  # two soft resets, a hard one, then soft again at seed 11
        used.reset(seed=seed)
        for _ in range(4):
            used.step(used.unwrapped.expert_action())
    assert used.unwrapped._soft_resets_left == 2
    fresh = make(task)
    observations = [used.reset(seed=11)[0], fresh.reset(seed=11)[0]]
    assert used.unwrapped._soft_resets_left == 1 and fresh.unwrapped._soft_resets_left == 2
    np.testing.assert_array_equal(*observations)
    for _ in range(6):
        action = used.unwrapped.expert_action()
        (obs, reward, _, _, info), (fresh_obs, fresh_reward, _, _, fresh_info) = used.step(action), fresh.step(action)
        np.testing.assert_array_equal(obs, fresh_obs)
        assert reward == fresh_reward
        for key in JOINT_METRICS:
            assert float(info[key]) == float(fresh_info[key])
    assert used.unwrapped._physics_record() == fresh.unwrapped._physics_record()
    twin = copy.deepcopy(used)  # raises where its replay in a new simulation differs
    action = used.unwrapped.expert_action()
    np.testing.assert_array_equal(twin.step(action)[0], used.step(action)[0])
    for env in (used, fresh, twin):
        env.close()


def test_the_kuka_reaches_the_workspace_edges_pointing_down():
    """The closed-form posture: the strip nearest the base, out of the elbow's reach from BulletArm's placement,
    the far edge and the top are reached within a millimetre, every joint inside its limits, at any yaw. (The
    last 2 cm of the near edge at table height and the far corners stay out of reach: no placement of this arm
    reaches a whole 0.4 m box pointing down.)"""
    env = make(robot="kuka", workspace_size=0.4)
    env.reset(seed=0)
    arm, sim = env.unwrapped.arm, env.unwrapped.sim
    for position in ([-0.17, 0.0, 0.01], [-0.17, 0.19, 0.05], [0.19, 0.0, 0.01], [0.15, -0.19, 0.1],
                     [0.0, 0.0, 0.25]):
        for yaw in (0.0, 0.7, np.pi / 2, 2.5):
            joints, realised = arm.solve_reachable(np.array(position), yaw)
            assert arm.within_limits(joints)
            assert abs((realised - yaw + np.pi / 2) % np.pi - np.pi / 2) < 1e-9  # the same grasp, mod pi
            for joint, angle in enumerate(joints):
                sim.resetJointState(arm.body, joint, float(angle), 0.0)
            flange = sim.getLinkState(arm.body, arm.spec.flange, computeForwardKinematics=1)
            target_position, target_orientation = arm.flange_target(position, realised)
            assert np.abs(np.array(flange[4]) - target_position).max() < 1e-3
            turn = sim.getDifferenceQuaternion(flange[5], target_orientation)
            assert 2 * np.arccos(min(1.0, abs(turn[3]))) < 1e-3
    env.close()


def test_gym_make_time_limit_and_the_env_checker():
    from gymnasium.utils.env_checker import check_env

    env = gym.make("cleanrl_equi/BlockPicking-v0", robot="panda", image_size=32, max_episode_steps=3)
    env.reset(seed=0)
    for step in range(1, 4):
        _, _, terminated, truncated, _ = env.step(np.zeros(5, np.float32))
    assert truncated and not terminated and env.spec.max_episode_steps == 3
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("robot", ["floating", "kuka", "panda"])
def test_stable_baselines3_env_checker_passes_without_a_warning(robot):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    # 64 px: SB3's default CNN needs 36 px at least, and says so with a warning; any other warning fails the test.
    env = gym.make("cleanrl_equi/DrawerOpening-v0", robot=robot, image_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_check_env(env.unwrapped, warn=True)
    env.close()


def test_a_dataset_of_one_robot_is_refused_by_a_run_with_another(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tool.main(tyro.cli(tool.Args, args=["--image-size", "32", "--max-steps", "3", "--num-episodes", "1",
                                         "--robot", "kuka"]))
    (name,) = os.listdir(tmp_path / "datasets")
    path = str(tmp_path / "datasets" / name)
    settings = od.load_dataset(path).metadata["env_settings"]
    assert settings["robot"] == "kuka"
    fails_with(capsys, ["--robot kuka", "not --robot floating"], od.load_dataset, path,
               env_settings={**settings, "robot": "floating"})


def test_a_run_with_an_arm_stops_and_resumes_with_the_same_robot(tmp_path):
    """A real SAC run with --robot kuka: stopped by SLURM's time-limit signal, resumed by the same command to the end;
    the same run name with another robot is refused (the resume file's settings include the robot)."""
    from conftest import run_script, script_fails_with, stop_with_signal

    flags = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8", "--learning-starts",
             "8", "--num-envs", "2", "--max-steps", "6", "--eval-frequency", "1000", "--eval-episodes", "1",
             "--num-eval-envs", "1", "--num-demos", "1", "--total-timesteps", "400", "--progress-interval", "0",
             "--run-name", "arm"]
    output = stop_with_signal("sac_equi_bullet.py", *flags, "--robot", "kuka", cwd=str(tmp_path))
    assert "checkpoint written" in output
    script_fails_with(run_script("sac_equi_bullet.py", *flags, "--robot", "panda", cwd=str(tmp_path), check=False),
                      "--robot")
    resumed = run_script("sac_equi_bullet.py", *flags, "--robot", "kuka", cwd=str(tmp_path))
    assert "resuming runs/arm from global step" in resumed.stdout and "step 400/400" in resumed.stdout
