"""Smooth, gentle motion: the physics metrics on scripted episodes, their symmetry, the env's shaping and compliance
kwargs, their flags in sac_equi_bullet.py, and the metrics in evaluations and datasets."""

import gymnasium as gym
import numpy as np
import pytest

import cleanrl_equi  # noqa: F401
from cleanrl_equi.datasets import collect_expert
from cleanrl_equi.envs.manipulation.metrics import (EPISODE_METRICS, JOINT_METRICS, PHYSICS_METRICS, action_change,
                                                  action_smoothness)
from cleanrl_equi.envs.manipulation.scene import rotate_scene_state
from conftest import QUARTER_TURN, fails_with, load_script, read_scalars, run_script, only_run_dir


def make(task, **kwargs):
    return gym.make(f"cleanrl_equi/{task}-v0", **kwargs).unwrapped


def scene_with_gripper_behind_block(env, seed=0):
    """BlockPulling with the closed gripper low, 8 cm behind the first block along -x (the block straight ahead)."""
    env.reset(seed=seed)
    state = env.get_scene_state()
    block = np.array(state["bodies"][0]["position"])
    state["gripper"].update(position=[block[0] - 0.08, block[1], 0.02], yaw=0.0, fingers=[0.0, 0.0], command=0.0)
    return state


def run_actions(env, actions, state=None, seed=0):
    if state is not None:
        _, info = env.reset(options={"scene_state": state})
    else:
        _, info = env.reset(seed=seed)
    for action in actions:
        _, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32))
        if terminated or truncated:
            break
    return {key: float(info[key]) for key in EPISODE_METRICS}


def test_every_metric_is_in_info_at_reset_and_at_every_step_as_a_0d_float_array():
    env = make("BlockPulling", image_size=32)
    _, info = env.reset(seed=0)
    for key in EPISODE_METRICS:
        assert isinstance(info[key], np.ndarray) and info[key].shape == () and float(info[key]) == 0.0
    _, _, _, _, info = env.step(env.action_space.sample())
    assert all(info[key].shape == () and np.isfinite(info[key]) for key in EPISODE_METRICS)
    assert float(info["path_length"]) > 0
    env.close()


def test_a_slow_push_is_gentler_and_smoother_than_a_fast_strike():
    """The same 10 cm of travel into the same block: 10 steps of 1 cm vs 2 steps of 5 cm."""
    env = make("BlockPulling", image_size=32, max_steps=50)
    state = scene_with_gripper_behind_block(env)
    slow = run_actions(env, [[-1, 0.2, 0, 0, 0]] * 10, state)
    fast = run_actions(env, [[-1, 1.0, 0, 0, 0]] * 2, state)
    assert slow["peak_grip_force"] > 0 and fast["peak_grip_force"] > 0  # both touched the block
    assert slow["peak_grip_force"] < fast["peak_grip_force"]
    assert slow["mean_squared_jerk"] < fast["mean_squared_jerk"]
    assert slow["peak_speed"] < fast["peak_speed"]
    assert slow["peak_object_acceleration"] < fast["peak_object_acceleration"]
    np.testing.assert_allclose(slow["path_length"], fast["path_length"], rtol=0.25)  # the same travel
    env.close()


def test_a_still_gripper_has_no_jerk_and_no_path():
    env = make("BlockPulling", image_size=32)
    env.reset(seed=0)
    command = 2 * env.gripper_command - 1  # the fingers' current command: nothing moves
    metrics = run_actions(env, [[command, 0, 0, 0, 0]] * 5, env.get_scene_state())
    assert metrics["mean_squared_jerk"] < 1e-6 and metrics["path_length"] < 1e-6 and metrics["peak_speed"] < 1e-4
    assert metrics["action_smoothness"] == 0.0 and metrics["action_change"] == 0.0
    env.close()


def test_a_cube_released_high_above_the_table_counts_as_one_drop():
    env = make("BlockPicking", image_size=32)
    env.reset(seed=0)
    state = env.get_scene_state()
    state["gripper"].update(position=[-0.1, -0.1, 0.2])
    state["bodies"][0].update(position=[0.05, 0.05, 0.15])  # 12.5 cm above its resting height
    metrics = run_actions(env, [[1, 0, 0, 0, 0]] * 3, state)
    assert metrics["drops"] == 1.0
    assert metrics["peak_impact_force"] > 5.0  # the landing, well above the cube's ~1 N weight
    resting = run_actions(env, [[1, 0, 0, 0, 0]] * 3, env.get_scene_state())  # now it rests: no drop
    assert resting["drops"] == 0.0
    env.close()


@pytest.mark.parametrize("task", ["BlockPulling", "BlockPicking", "DrawerOpening"])
def test_the_metrics_do_not_change_when_the_scene_is_turned(task):
    """The same actions, with (dx, dy) turned with the scene, give the same metrics after 1, 2 and 3 quarter turns."""
    env = make(task, image_size=32)
    env.reset(seed=3)
    actions = []
    for _ in range(6):  # a planner prefix, so the gripper reaches and touches the objects
        actions.append(env.expert_action())
        _, _, terminated, truncated, _ = env.step(actions[-1])
        if terminated or truncated:
            break
    env.reset(seed=3)
    state = env.get_scene_state()
    reference = run_actions(env, actions, state)
    for k in (1, 2, 3):
        rotation = np.linalg.matrix_power(QUARTER_TURN, k)
        turned = [np.concatenate([a[:1], rotation @ a[1:3], a[3:]]) for a in actions]
        rotated = run_actions(env, turned, rotate_scene_state(state, k))
        for key in EPISODE_METRICS:
            # pybullet's solver sees the turned scene in other coordinates: equal up to its contact noise
            np.testing.assert_allclose(rotated[key], reference[key], rtol=0.05, atol=0.05 * max(1.0, reference[key]),
                                       err_msg=f"{task}: {key} after {k} quarter turns")
    env.close()


def test_metrics_off_leaves_only_the_action_metrics_and_the_same_physics():
    on, off = make("BlockPulling", image_size=32), make("BlockPulling", image_size=32, physics_metrics=False)
    actions = np.random.default_rng(0).uniform(-1, 1, (8, 5))
    observations = []
    for env in (on, off):
        obs, info = env.reset(seed=1)
        for action in actions:
            obs, _, _, _, info = env.step(action)
        observations.append(obs)
        assert ("peak_grip_force" in info) == (env is on)
        assert "action_smoothness" in info
    np.testing.assert_array_equal(*observations)  # measuring does not move anything


def test_action_metrics():
    constant = np.ones((10, 5))
    assert action_smoothness(constant) == 0.0 and action_change(constant) == 0.0
    steps = np.zeros((3, 5))
    steps[1, 0] = 1.0
    assert action_change(steps) == 1.0


def test_reward_shaping_penalises_action_changes_and_strong_contact_and_keeps_success():
    state_env = make("BlockPulling", image_size=32)
    state = scene_with_gripper_behind_block(state_env)
    strike = [[-1, 1.0, 0, 0, 0], [-1, 1.0, 0, 0, 0]]
    rewards = {}
    for name, kwargs in (("plain", {}), ("force", {"force_penalty": 1.0, "force_threshold": 5.0}),
                         ("rate", {"action_rate_penalty": 0.5})):
        env = make("BlockPulling", image_size=32, **kwargs)
        env.reset(options={"scene_state": state})
        rewards[name] = [env.step(np.asarray(a, dtype=np.float32))[1] for a in [*strike, [-1, -1.0, 0, 0, 0]]]
        env.close()
    assert rewards["plain"][:2] == [0.0, 0.0]
    assert min(rewards["force"][:2]) < 0  # the strike pressed harder than 5 N
    assert rewards["rate"][0] == 0.0 and rewards["rate"][1] == 0.0  # the same action twice: no change
    assert rewards["rate"][2] == pytest.approx(rewards["plain"][2] - 0.5 * 4.0)  # dx went from 1 to -1


def test_a_softer_gripper_presses_less():
    forces = {}
    for force in (150.0, 20.0):
        env = make("BlockPulling", image_size=32, gripper_force=force)
        env.reset(seed=0)
        state = env.get_scene_state()
        state["gripper"].update(position=[0.0, 0.0, 0.03], command=0.0, fingers=[0.0, 0.0])
        state["bodies"][0].update(position=[0.0, 0.0, 0.02])  # a block right under the gripper
        state["bodies"][1].update(position=[0.1, 0.1, 0.02])
        forces[force] = run_actions(env, [[-1, 0, 0, -1, 0]] * 2, state)["peak_grip_force"]  # press down into it
        env.close()
    assert 0 < forces[20.0] < forces[150.0]


@pytest.mark.parametrize("kwargs, words", [({"gripper_force": 0.0}, "gripper_force"),
                                            ({"force_penalty": -1.0}, "force_penalty"),
                                            ({"force_threshold": 0.0}, "force_threshold")])
def test_bad_gentle_motion_kwargs_raise_one_clear_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        make("BlockPulling", **kwargs)


def test_datasets_keep_the_metrics_of_every_episode():
    dataset = collect_expert("cleanrl_equi/BlockPulling-v0", 2, seed=0, image_size=32)
    per_episode, means = dataset.metadata["episode_metrics"], dataset.metadata["metric_means"]
    assert set(per_episode) == set(EPISODE_METRICS) and all(len(v) == 2 for v in per_episode.values())
    assert means["peak_grip_force"] == pytest.approx(np.mean(per_episode["peak_grip_force"]))
    assert all(v > 0 for v in per_episode["path_length"])


sac = load_script("sac_equi_bullet")


@pytest.mark.parametrize("flags, words", [({"force_penalty": -0.1}, "--force-penalty"),
                                          ({"gripper_force": 0.5}, "--gripper-force"),
                                          ({"action_rate_penalty": -1.0}, "--action-rate-penalty")])
def test_sac_gentle_motion_flags_are_checked(flags, words, capsys):
    fails_with(capsys, [words], sac.check_args, sac.Args(**flags))


def test_sac_evaluation_logs_every_metric_and_passes_the_shaping_to_the_envs(tmp_path):
    run_script("sac_equi_bullet.py", "--total-timesteps", "60", "--learning-starts", "40",
               "--batch-size", "8", "--num-demos", "1", "--group-order", "4", "--n-hidden", "8", "--image-size", "32",
               "--eval-frequency", "4", "--eval-episodes", "2", "--max-steps", "10", "--force-penalty", "0.5",
               "--force-threshold", "1", "--gripper-force", "100", cwd=tmp_path)
    scalars = read_scalars(only_run_dir(tmp_path))
    for key in PHYSICS_METRICS + ("action_smoothness", "success_rate", "discounted_return"):
        assert f"eval/{key}" in scalars, key
    args = sac.Args(force_penalty=0.5, gripper_force=100.0, image_size=32, max_steps=10)
    envs = sac.make_envs(args, 1)
    env = envs.unwrapped.envs[0].unwrapped
    assert env.force_penalty == 0.5 and env.gripper_force == 100.0 and env.physics_metrics
    envs.close()


# ---- joint metrics of the robot arms (robots.py) ----
def test_joint_metrics_slow_vs_fast_still_arm_and_reset():
    """The same 10 cm with the Kuka: 10 steps of 1 cm move its joints as far as 2 steps of 5 cm, slower and with
    less jerk; a still arm has no joint path and no jerk (its motors still hold it up: torque, not motion); a reset
    starts the episode's values from 0, and the floating gripper reports 0 for every joint metric."""
    env = make("BlockPicking", image_size=32, robot="kuka")
    env.reset(seed=0)
    state = env.get_scene_state()
    slow = run_actions(env, [[1, 0.2, 0, 0, 0]] * 10, state)
    fast = run_actions(env, [[1, 1.0, 0, 0, 0]] * 2, state)
    assert slow["peak_joint_speed"] < fast["peak_joint_speed"]
    assert slow["mean_squared_joint_jerk"] < fast["mean_squared_joint_jerk"]
    np.testing.assert_allclose(slow["joint_path_length"], fast["joint_path_length"], rtol=0.25)
    still = run_actions(env, [[1, 0, 0, 0, 0]] * 5, state)
    # Not exactly 0: the motors settle the arm's weight after the reset and re-solve the pose each step.
    assert still["joint_path_length"] < 0.01
    assert still["mean_squared_joint_jerk"] < 1e-3 * fast["mean_squared_joint_jerk"]
    assert still["rms_joint_torque"] > 1.0  # holding the arm against gravity
    _, info = env.reset(seed=0)
    assert all(float(info[key]) == 0.0 for key in JOINT_METRICS)
    env.close()
    floating = make("BlockPicking", image_size=32)
    assert all(value == 0.0 for key, value in run_actions(floating, [[1, 1, 0, 0, 0]] * 2).items()
               if key in JOINT_METRICS)
    floating.close()


# ---- the action filter (action_filter_tau): an action-space physics prior ----
def free_gripper_state(env, seed=0):
    """The gripper open, high above the table, away from every object: its moves touch nothing."""
    env.reset(seed=seed)
    state = env.get_scene_state()
    state["gripper"].update(position=[0.0, 0.0, 0.2], yaw=0.0)
    return state


def test_the_action_filter_follows_a_step_command_gradually_with_less_jerk():
    """A step from rest to full dx: the filtered gripper moves gain, then gain + (1 - gain) gain, ... of a full step
    (gain = 1 - exp(-0.183 s / tau)), and the episode's mean squared jerk is lower than the unfiltered one."""
    metrics, moved = {}, {}
    for tau in (0.0, 0.2):
        env = make("BlockPulling", image_size=32, action_filter_tau=tau)
        env.reset(options={"scene_state": free_gripper_state(env)})
        xs = [env.gripper_pose()[0][0]]
        for action in [[1, 0, 0, 0, 0]] + [[1, 0.6, 0, 0, 0]] * 4:
            _, _, _, _, info = env.step(np.asarray(action, dtype=np.float32))
            xs.append(env.gripper_pose()[0][0])
        metrics[tau], moved[tau] = float(info["mean_squared_jerk"]), np.diff(xs)[1:]
        gain = env.action_filter_gain
        env.close()
    assert gain == pytest.approx(1 - np.exp(-44 / 240 / 0.2))
    expected = 0.6 * 0.05 * (1 - (1 - gain) ** np.arange(1, 5))  # the filter's response to the step
    np.testing.assert_allclose(moved[0.2], expected, atol=1e-3)
    np.testing.assert_allclose(moved[0.0], 0.03, atol=1e-3)
    assert metrics[0.2] < 0.85 * metrics[0.0]


def test_the_action_filter_off_by_default_leaves_the_env_as_it_was():
    """Default, tau 0 and a tau so short that the filter passes every command on (gain 1) give the same observations
    along a seeded random episode, and the scene state gains no filter memory unless the filter is on."""
    actions = np.random.default_rng(2).uniform(-1, 1, (8, 5)).astype(np.float32)
    runs = []
    for kwargs in ({}, {"action_filter_tau": 0.0}, {"action_filter_tau": 1e-4}):
        env = make("BlockPulling", image_size=32, **kwargs)
        observations = [env.reset(seed=5)[0]] + [env.step(a)[0] for a in actions]
        runs.append(np.stack(observations))
        assert ("motion" in env.get_scene_state()["gripper"]) == bool(kwargs.get("action_filter_tau"))
        env.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


def test_a_copy_of_a_filtered_env_continues_exactly():
    import copy
    import pickle

    env = make("BlockPicking", image_size=32, action_filter_tau=0.3)
    env.reset(seed=1)
    actions = np.random.default_rng(3).uniform(-1, 1, (6, 5)).astype(np.float32)
    for action in actions[:3]:
        env.step(action)
    assert np.abs(env.executed_motion).max() > 0
    copies = [copy.deepcopy(env), pickle.loads(pickle.dumps(env))]
    for twin in copies:
        np.testing.assert_array_equal(twin.executed_motion, env.executed_motion)
    for action in actions[3:]:
        expected = env.step(action)[0]
        for twin in copies:
            np.testing.assert_array_equal(twin.step(action)[0], expected)
            np.testing.assert_array_equal(twin.executed_motion, env.executed_motion)
    for other in (env, *copies):
        other.close()


def test_the_filter_memory_is_restored_with_the_scene_and_reset_with_the_episode():
    env = make("BlockPulling", image_size=32, action_filter_tau=0.3)
    env.reset(options={"scene_state": free_gripper_state(env)})
    env.step(np.array([1, 1, 0, 0, 0], dtype=np.float32))
    state = env.get_scene_state()
    assert state["gripper"]["motion"][0] > 0.01
    after = env.step(np.array([1, 1, 0, 0, 0], dtype=np.float32))[0]
    env.reset(options={"scene_state": state})  # at rest, but the filter remembers the last move
    np.testing.assert_array_equal(env.step(np.array([1, 1, 0, 0, 0], dtype=np.float32))[0], after)
    env.reset(seed=0)
    np.testing.assert_array_equal(env.executed_motion, np.zeros(4))
    env.close()


def test_a_turned_scene_with_turned_actions_gives_the_turned_observation_with_the_filter_on():
    """The filter memory turns with the scene (rotate_scene_state), so continuing with turned actions turns the
    images, after 1, 2 and 3 quarter turns."""
    env = make("BlockPulling", action_filter_tau=0.3)  # 128 x 128: the symmetry test's resolution
    env.reset(seed=3)
    for _ in range(3):  # a planner prefix: the filter is mid-motion toward the blocks
        env.step(env.expert_action())
    state = env.get_scene_state()
    assert np.abs(state["gripper"]["motion"][:2]).max() > 0.005
    actions = [np.array([1, 0.8, -0.5, -0.3, 0.2], dtype=np.float32), np.array([1, -0.2, 0.9, 0, 0], dtype=np.float32)]
    env.reset(options={"scene_state": state})
    reference = [env.step(a)[0] for a in actions]
    for k in (1, 2, 3):
        rotation = np.linalg.matrix_power(QUARTER_TURN, k)
        env.reset(options={"scene_state": rotate_scene_state(state, k)})
        for action, expected in zip(actions, reference):
            turned = np.concatenate([action[:1], rotation @ action[1:3], action[3:]]).astype(np.float32)
            observation = env.step(turned)[0]
            differing = np.abs(np.rot90(expected[0], k).astype(int) - observation[0]) > 1
            assert differing.mean() < 0.001, f"{differing.sum()} pixels differ after {k} quarter turns"
            np.testing.assert_array_equal(observation[1], expected[1])
    env.close()


def test_a_bad_action_filter_tau_raises_one_clear_error(capsys):
    with pytest.raises(ValueError, match="action_filter_tau"):
        make("BlockPulling", action_filter_tau=-0.1)
    fails_with(capsys, ["--action-filter-tau"], sac.check_args, sac.Args(action_filter_tau=5.0))
    assert sac.Args(action_filter_tau=0.2).env_kwargs()["action_filter_tau"] == 0.2
    assert sac.Args(action_filter_tau=0.2).env_settings()["action_filter_tau"] == 0.2


def test_the_study_benchmark_names_settings_judges_the_target_and_grows_with_keep(tmp_path, monkeypatch, capsys):
    """benchmarks/smooth_gentle_study.py: "+"-joined settings give their flags, the target (success within 0.05 of
    no prior's, peak grip force <= 2x and jerk <= 10x the planner's) is judged per task, and --keep carries an
    earlier results file's runs into the new one (here with --collect-only over an empty runs folder)."""
    import importlib.util
    import json
    import os
    import sys

    from conftest import REPO

    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))  # as `python benchmarks/...` has it
    spec = importlib.util.spec_from_file_location("smooth_gentle_study",
                                                  os.path.join(REPO, "benchmarks", "smooth_gentle_study.py"))
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "smooth_gentle_study", study)
    spec.loader.exec_module(study)
    assert study.setting_flags("filter0.1+lagrange5") == ["--action-filter-tau", "0.1", "--cost-limit", "5.0"]
    assert study.setting_flags("adv0.1") == ["--smooth-adversarial-weight", "0.1"]
    assert study.setting_flags("lagrange_ep5") == ["--cost-limit", "5.0", "--lambda-update", "episodes"]
    with pytest.raises(SystemExit):
        study.setting_flags("gentle")
    assert "unknown setting 'gentle'" in capsys.readouterr().err

    def run(setting, seed, success, force, jerk):
        row = {"task": "BlockPulling", "setting": setting, "seed": seed, "gradient_steps": 4000, "last_evals": 4,
               "best_success": success, "final_lambda": 0.0, "curve": [[250, 500], [0.0, success]]}
        row.update({m: 0.0 for m in study.METRICS})
        row.update(success_rate=success, peak_grip_force=force, mean_squared_jerk=jerk)
        return row

    runs = [run("base", 1, 0.9, 120.0, 1e7), run("lagrange1", 1, 0.88, 40.0, 1e6), run("force0.1", 1, 0.5, 10.0, 1e4)]
    runs[1].update({m: 1.0 for m in study.JOINT_METRICS} | {"peak_joint_torque": 50.0})  # an arm's run
    planner = run("planner", 0, 1.0, 23.0, 1.5e5)
    summary = {s["setting"]: s for s in study.summarise(runs + [planner])}
    assert summary["lagrange1"]["peak_joint_torque"]["mean"] == 50.0 and "peak_joint_torque" not in summary["base"]
    checks = {c["setting"]: c for c in study.target_check(list(summary.values()))}
    assert checks["lagrange1"]["reached"] and not checks["force0.1"]["reached"]  # 0.4 less success than no prior
    assert checks["lagrange1"]["force_vs_planner"] == pytest.approx(40 / 23)

    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": runs}))
    out = tmp_path / "study.json"
    monkeypatch.setattr(sys, "argv", ["smooth_gentle_study.py", "--collect-only", "--keep", str(earlier), "--out",
                                      str(out), "--runs-dir", str(tmp_path / "none"), "--planner-episodes", "0"])
    study.main()
    written = json.loads(out.read_text())
    assert [(r["setting"], r["seed"]) for r in written["runs"]] == [("base", 1), ("lagrange1", 1), ("force0.1", 1)]
    assert (tmp_path / "study_curves.png").stat().st_size > 0
    header, base_row, arm_row, _ = (tmp_path / "study.csv").read_text().splitlines()
    torque = header.split(",").index("peak_joint_torque")
    assert base_row.split(",")[torque] == "" and arm_row.split(",")[torque] == "50.0"  # the gripper has no joints
