"""dqn_equi_bullet.py: exact symmetry of the Q map on real observations, the discrete actions and the planner's
demonstrations, short runs, checkpoints, resume, errors.

Everything runs on CPU with tiny networks (n_hidden 8, 16 or 32 px images) so the file takes about a minute.
"""

import math
import os
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi.buffers import ReplayBuffer
from cleanrl_equi.envs.manipulation import make_envs, obs_to_tensor
from cleanrl_equi.envs.manipulation.scene import rotate_scene_state
from cleanrl_equi.checkpoints import save_checkpoint
from conftest import (QUARTER_TURN, assert_equivariant, fails_with, load_script, manipulation_observations,
                      max_equivariance_error, only_run_dir, read_scalars, run_script, script_fails_with,
                      stop_with_signal)

SCRIPT = "dqn_equi_bullet.py"
# BulletArm's smaller scene: its discretised planner episodes take about 14 steps (the paper's about 24)
TINY = ["--n-hidden", "8", "--image-size", "16", "--batch-size", "8", "--learning-starts", "8", "--num-envs", "2",
        "--num-demos", "1", "--max-demo-attempts", "60", "--workspace-size", "0.3", "--no-paper-tasks", "--max-steps",
        "18", "--buffer-size", "2000", "--total-timesteps", "40", "--eval-frequency", "10", "--eval-episodes", "2",
        "--num-eval-envs", "2", "--log-frequency", "4"]
TURNS = (1, 2, 3)

dqn = load_script("dqn_equi_bullet")


def tiny_args(**kwargs):
    return dqn.Args(**{"n_hidden": 8, "image_size": 32, **kwargs})


def turn(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


def turn_index(index: np.ndarray, k: int) -> np.ndarray:
    """Where an action's Q value sits after turning the 3 x 3 Q map by k quarter turns (torch.rot90)."""
    grid = np.arange(dqn.NUM_ACTIONS).reshape(dqn.NUM_CHANNELS, 3, 3)
    turned = np.rot90(grid, k, axes=(1, 2)).reshape(-1)  # turned[new position] = old index
    position_of = np.argsort(turned)
    return position_of[np.asarray(index)]


@pytest.fixture(scope="module")
def observations():
    x = manipulation_observations(image_size=32)
    assert x[:, 1].max() == 1.0 and x[:, 1].min() == 0.0  # holding and not holding both appear
    return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_q_map_turns_with_the_image_on_real_observations(mode, observations):
    """A quarter turn of the image turns the 3 x 3 map of (dx, dy) moves with it and leaves the 18 channels
    (dz x dtheta x p) of every move unchanged, to float error, with the filters rebuilt (train) or cached (eval)."""
    torch.manual_seed(0)
    q_network = dqn.EquiQNetwork(tiny_args())
    getattr(q_network, mode)()
    with torch.no_grad():
        assert q_network(observations).std() > 1e-3  # not trivially constant
    error = assert_equivariant(q_network, observations, [(lambda x, k=k: turn(x, k), lambda q, k=k: turn(q, k))
                                                         for k in TURNS], tolerance=1e-5)
    print(f"max equivariance error ({mode} mode): {error:.2e}")
    # a turn of the image is another state: the map must turn, not stay (it is not invariant)
    assert max_equivariance_error(q_network, observations, [(lambda x: turn(x, 1), lambda q: q)]) > 1e-4
    # the plain CNN has no such constraint
    torch.manual_seed(0)
    cnn = dqn.CNNQNetwork(tiny_args(model="cnn"))
    assert max_equivariance_error(cnn, observations, [(lambda x: turn(x, 1), lambda q: turn(q, 1))]) > 1e-4


def test_greedy_action_turns_with_the_world(observations):
    """The greedy action of a turned image is the turned greedy action: its (dx, dy) turns by R = [[0, -1], [1, 0]]
    per quarter turn (the env's convention), p, dz and dtheta are unchanged. An image that a half turn leaves
    alone (an empty table: the two fingers) has exactly equal Q for opposite moves, and argmax breaks such a tie by
    index, not by symmetry: those observations are left out."""
    torch.manual_seed(1)
    q_network = dqn.EquiQNetwork(tiny_args())
    obs = (observations * 255).round().to(torch.uint8).numpy()
    with torch.no_grad():
        top2 = q_network(observations).flatten(1).topk(2).values
        obs = obs[(top2[:, 0] - top2[:, 1]).numpy() > 1e-4]
        assert len(obs) >= len(observations) // 2
        action = dqn.decode_actions(dqn.greedy_actions(q_network, obs, "cpu"))
        for k in TURNS:
            turned = dqn.decode_actions(dqn.greedy_actions(q_network, np.rot90(obs, k, axes=(2, 3)).copy(), "cpu"))
            rotation = np.linalg.matrix_power(QUARTER_TURN, k)
            np.testing.assert_allclose(turned[:, 1:3], action[:, 1:3] @ rotation.T, atol=1e-6)
            np.testing.assert_array_equal(turned[:, [0, 3, 4]], action[:, [0, 3, 4]])


def test_the_162_actions_decode_encode_and_turn():
    index = np.arange(dqn.NUM_ACTIONS)
    actions = dqn.decode_actions(index)
    assert actions.shape == (162, 5) and set(np.unique(actions)) == {-1.0, 0.0, 1.0}
    assert set(actions[:, 0]) == {-1.0, 1.0}  # p: closed or open, no half-open
    assert len({tuple(a) for a in actions}) == 162  # every combination once
    np.testing.assert_array_equal(dqn.encode_actions(actions), index)
    # the map position (row, column) is the move (dx, dy) = (row - 1, column - 1) in steps of dpos
    channel, cell = np.divmod(index, 9)
    np.testing.assert_array_equal(actions[:, 1], cell // 3 - 1)
    np.testing.assert_array_equal(actions[:, 2], cell % 3 - 1)
    # turning the Q map by rot90 moves each action's value to the action turned by R, the rest unchanged
    for k in TURNS:
        turned = dqn.decode_actions(turn_index(index, k))
        rotation = np.linalg.matrix_power(QUARTER_TURN, k)
        np.testing.assert_allclose(turned[:, 1:3], actions[:, 1:3] @ rotation.T, atol=1e-12)
        np.testing.assert_array_equal(turned[:, [0, 3, 4]], actions[:, [0, 3, 4]])
    # nearest neighbour: each continuous action goes to the closest of the 162 in every component
    rng = np.random.default_rng(0)
    continuous = rng.uniform(-1, 1, size=(500, 5)).astype(np.float32)
    nearest = dqn.decode_actions(dqn.encode_actions(continuous))
    assert np.abs(nearest[:, 1:] - continuous[:, 1:]).max() <= 0.5
    np.testing.assert_array_equal(nearest[:, 0], np.where(continuous[:, 0] > 0, 1.0, -1.0))
    for k in TURNS:  # the discretisation commutes with the turn
        rotation = np.linalg.matrix_power(QUARTER_TURN, k)
        turned = continuous.copy()
        turned[:, 1:3] = continuous[:, 1:3] @ rotation.T
        np.testing.assert_array_equal(dqn.encode_actions(turned), turn_index(dqn.encode_actions(continuous), k))


@pytest.mark.parametrize("task, paper", [("BlockPulling", True), ("BlockPicking", False)])
def test_discretised_planner_actions_move_the_gripper_and_keep_the_symmetry(task, paper):
    """Real planner actions with the paper's DQN steps (dpos 0.02, dtheta pi/16), planned for whole steps as the
    demonstrations are: each is one of the 162 discrete actions already, it moves the gripper by its (dx, dy, dz)
    steps of dpos and turns it by dtheta steps of pi/16; in the scene turned by a quarter turn, the planner's
    action is the turned discrete action (and so is the rounded continuous planner's)."""
    args = tiny_args(env_id=f"cleanrl_equi/{task}-v0", image_size=16, paper_tasks=paper,
                     workspace_size=0.4 if paper else 0.3)
    env = make_envs(args, 1).unwrapped.envs[0].unwrapped
    env.reset(seed=3)
    for _ in range(8):
        state = env.get_scene_state()
        planned = env.expert_action(discrete=True)
        index = dqn.encode_actions(planned[None])
        np.testing.assert_array_equal(dqn.decode_actions(index)[0], planned)
        rounded = dqn.encode_actions(env.expert_action()[None])
        for k in TURNS:
            env.reset(options={"scene_state": rotate_scene_state(state, k)})
            assert dqn.encode_actions(env.expert_action(discrete=True)[None]) == turn_index(index, k)
            assert dqn.encode_actions(env.expert_action()[None]) == turn_index(rounded, k)
        env.reset(options={"scene_state": state})
        action = dqn.decode_actions(index)[0]
        (x0, y0, z0), yaw0 = env.gripper_pose()
        _, _, terminated, truncated, _ = env.step(action)
        (x1, y1, z1), yaw1 = env.gripper_pose()
        np.testing.assert_allclose([x1 - x0, y1 - y0, z1 - z0], action[1:4] * 0.02, atol=2e-3)
        assert abs(math.remainder(yaw1 - yaw0 - action[4] * math.pi / 16, 2 * math.pi)) < 0.02
        if terminated or truncated:
            break
    env.close()


def planner_successes(env, seeds, discrete: bool) -> int:
    """Seeded planner episodes driven by the DQN's discrete actions (the planner's, rounded as the demos are)."""
    successes = 0
    for seed in seeds:
        env.reset(seed=seed)
        terminated = truncated = False
        while not (terminated or truncated):
            action = dqn.decode_actions(dqn.encode_actions(env.expert_action(discrete=discrete)[None]))[0]
            _, _, terminated, truncated, info = env.step(action)
        successes += bool(info["is_success"])
    return successes


def test_whole_step_planner_succeeds_where_the_rounded_planner_stopped_short():
    """Block Pulling in the DQN's default scene and grid (0.4 m, 100 steps, 10 cm blocks, dpos 0.02, pi/16): the
    continuous planner's actions, rounded, stop short of its 5 mm / 0.05 rad waypoints (most seeds fail), while the
    planner that plans for whole steps succeeds on every seed."""
    env = make_envs(tiny_args(image_size=16), 1).unwrapped.envs[0].unwrapped
    assert (env.dpos, env.drot, env.max_steps, env.workspace_size) == (0.02, math.pi / 16, 100, 0.4)
    seeds = range(6)
    assert planner_successes(env, seeds, discrete=True) == len(seeds)
    assert planner_successes(env, seeds, discrete=False) <= 2
    env.close()


def test_demo_collection_keeps_what_it_tries_and_says_how_far_it_is(workdir):
    """A real run's demo collection (the CPU preset's scene): at least 90% of the planner episodes it tries are kept;
    it prints a progress line while collecting, and no line before the first evaluation says nan."""
    proc = run_script(SCRIPT, *TINY, "--max-steps", "50", "--num-demos", "10", "--max-demo-attempts", "40",
                      "--progress-interval", "0", cwd=workdir)
    kept, attempts = map(int, re.search(r"(\d+) demo episodes \(\d+ transitions\) kept of (\d+)", proc.stdout).groups())
    assert kept == 10 and kept >= 0.9 * attempts, proc.stdout
    assert "collecting 10 planner demonstrations" in proc.stdout and "demos: " in proc.stdout
    assert "no evaluation yet" in proc.stdout and "nan" not in proc.stdout.lower(), proc.stdout


def test_replay_buffer_never_joins_episodes_and_drops_what_it_is_told():
    """The shared buffer as the DQN uses it: integer action indices (stored as int16, sampled as int64)."""
    rb = ReplayBuffer(capacity=12, num_envs=2, image_size=16, action_shape=(), action_dtype=np.int16)

    def frames(value0, value1):
        obs = np.zeros((2, 2, 16, 16), np.uint8)
        obs[0, 0], obs[1, 0], obs[1, 1] = value0, value1, 255
        return obs

    rb.start(frames(0, 100))
    rows = []
    for step, done0 in ((1, False), (2, True), (3, False)):
        resetting = np.array([step == 3, False])
        rows.append(rb.add(np.array([step, step]), np.array([float(done0), 0.0]), np.array([done0, False]),
                           ~resetting, frames(step, 100 + step)))
    assert len(rb) == 5
    batch = rb.sample(200, torch.device("cpu"))
    obs_value, next_value = batch["obs"][:, 0, 0, 0] * 255, batch["next_obs"][:, 0, 0, 0] * 255
    torch.testing.assert_close(next_value - obs_value, torch.ones_like(obs_value), atol=1e-3, rtol=0)
    torch.testing.assert_close(obs_value % 100, batch["actions"].float() - 1, atol=1e-3, rtol=0)
    assert not ((obs_value == 2) & (next_value == 3)).any()  # the reset row is never sampled
    assert ((batch["obs"][:, 1] == 1) == (obs_value >= 100)[:, None, None]).all()  # env 1's flag, tiled
    rb.valid[rows[:2], 0] = False  # a failed demo of env 0 is dropped
    assert len(rb) == 3 and (rb.sample(50, torch.device("cpu"))["obs"][:, 1] == 1).all()


def test_resume_files_of_the_older_dqn_buffer_still_load():
    """A resume file written by the DQN's own buffer before the shared one (no `keep` scalar, no `expert` flags)
    loads into the shared buffer: the same transitions, none of them marked as demonstrations, nothing kept."""
    rb = ReplayBuffer(capacity=12, num_envs=2, image_size=16, action_shape=(), action_dtype=np.int16)
    obs = np.zeros((2, 2, 16, 16), np.uint8)
    rb.start(obs)
    for step in range(3):
        obs[:, 0] = step + 1
        rb.add(np.array([step, 100 + step]), np.array([1.0, 0.0]), np.array([False, True]), np.ones(2, bool), obs,
               expert=True)
    old_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rb.state_dict().items()
                 if k not in ("keep", "expert")}
    assert set(old_state) == {"pos", "filled", "heights", "holding", "actions", "rewards", "terminated", "valid"}
    loaded = ReplayBuffer(capacity=12, num_envs=2, image_size=16, action_shape=(), action_dtype=np.int16)
    loaded.load_state_dict(old_state)
    assert (loaded.pos, loaded.filled, loaded.keep, len(loaded)) == (rb.pos, rb.filled, 0, len(rb)) == (3, 4, 0, 6)
    for key in ("heights", "holding", "actions", "rewards", "terminated", "valid"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(rb, key))
    assert not loaded.expert.any()
    batch = loaded.sample(20, torch.device("cpu"))
    assert batch["actions"].dtype == torch.int64 and set(batch["actions"].tolist()) <= {0, 1, 2, 100, 101, 102}


def check_scalars(cwd):
    scalars = read_scalars(only_run_dir(cwd))
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/episodic_success", "charts/SPS",
                "charts/epsilon", "charts/updates_per_second", "losses/td_loss", "losses/q_values",
                "eval/success_rate", "eval/discounted_return", "eval/episode_length", "eval/action_smoothness",
                "eval/action_change"):
        assert tag in scalars, f"{tag} missing; got {sorted(scalars)}"
        assert all(np.isfinite(v) for _, v in scalars[tag])
    assert [v for _, v in scalars["eval/gradient_steps"]] == [10, 20]
    return scalars


def test_short_run_writes_the_scalars_and_its_checkpoint_acts_the_same(workdir):
    proc = run_script(SCRIPT, *TINY, "--save-model", "--start-e", "0.5", "--end-e", "0.1", cwd=workdir)
    demos = re.search(r"(\d+) demo episodes \((\d+) transitions\) kept of (\d+)", proc.stdout)
    assert demos and int(demos.group(1)) == 1 and int(demos.group(2)) > 1, proc.stdout
    assert "eval @ 20 gradient steps" in proc.stdout
    scalars = check_scalars(workdir)
    epsilon = [v for _, v in scalars["charts/epsilon"]]
    assert epsilon[0] < 0.5 and epsilon == sorted(epsilon, reverse=True) and min(epsilon) >= 0.1 - 1e-6
    # save -> load in a fresh process -> the same evaluation episodes give the same metrics, to every digit
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs if f.endswith(".cleanrl_model")]
    in_training = re.search(r"final eval: (.*)", proc.stdout).group(1)
    proc = run_script(SCRIPT, "--eval-checkpoint", path, "--eval-episodes", "2", "--num-eval-envs", "2", cwd=workdir)
    assert re.search(r"\(equi\): (.*)", proc.stdout).group(1) == in_training
    checkpoint = torch.load(path, weights_only=False)
    assert not any("filter" in key or "expanded_bias" in key for key in checkpoint["q_network"])  # parameters only
    env = gym.make("cleanrl_equi/BlockPulling-v0", image_size=16).unwrapped
    obs = np.stack([env.reset(seed=s)[0] for s in range(6)])
    env.close()
    (net_a, saved), (net_b, _) = dqn.load_q_network(path, "cpu"), dqn.load_q_network(path, "cpu")
    assert saved.image_size == 16 and saved.dpos == 0.02 and saved.workspace_size == 0.3 and not saved.paper_tasks
    with torch.no_grad():
        first = net_a(obs_to_tensor(obs, "cpu"))
        net_b.eval()  # the cached eval-mode filters give the same Q values as train mode
        torch.testing.assert_close(net_b(obs_to_tensor(obs, "cpu")), first, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(dqn.greedy_actions(net_b, obs, "cpu"), first.flatten(1).argmax(1).numpy())


@pytest.mark.parametrize("args, words", [
    (dict(env_id="cleanrl_equi/NoSuchTask-v0"), "unknown env id"),
    (dict(env_id="CartPole-v1"), "not a manipulation task"),
    (dict(image_size=100), "--image-size"),
    (dict(n_hidden=12), "--n-hidden"),
    (dict(dpos=0.5), "--dpos"),
    (dict(workspace_size=1.0), "--workspace-size"),
    (dict(drot_n=1), "--drot-n"),
    (dict(gamma=1.5), "--gamma"),
    (dict(start_e=-0.1), "--start-e"),
    (dict(learning_rate=0.0), "--learning-rate"),
    (dict(batch_size=256, learning_starts=100), "--learning-starts"),
    (dict(buffer_size=10), "--buffer-size"),
    (dict(num_demos=100, max_demo_attempts=10), "--max-demo-attempts"),
])
def test_bad_settings_stop_with_one_sentence(args, words, capsys):
    fails_with(capsys, [words], dqn.check_args, tiny_args(**args))


def test_bad_checkpoints_stop_with_one_sentence(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.cleanrl_model"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = str(tmp_path / "foreign.cleanrl_model")
    save_checkpoint(foreign, "sac_equi_bullet", tiny_args(), actor={})
    mismatched = str(tmp_path / "mismatched.cleanrl_model")
    save_checkpoint(mismatched, "dqn_equi_bullet", tiny_args(),
                    q_network=dqn.EquiQNetwork(tiny_args(n_hidden=16)).state_dict())
    for path, words in ((str(tmp_path / "missing.cleanrl_model"), "does not exist"), (str(corrupt), "corrupt"),
                        (foreign, "sac_equi_bullet"), (mismatched, "does not fit")):
        fails_with(capsys, [words], dqn.load_q_network, path, "cpu")


def test_bad_flag_from_the_command_line(workdir):
    proc = run_script(SCRIPT, "--dpos", "0.5", cwd=workdir, check=False)
    script_fails_with(proc, "--dpos")
    assert not os.path.exists(os.path.join(workdir, "runs"))  # stopped before making a run directory


def test_unknown_model_is_refused_by_the_command_line(workdir):
    """`--model` is a choice of two: tyro refuses anything else before the script starts, naming both."""
    proc = run_script(SCRIPT, "--model", "mlp", cwd=workdir, check=False)
    assert proc.returncode != 0
    assert "equi" in proc.stderr and "cnn" in proc.stderr and "mlp" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "runs"))


def test_stopped_run_resumes_with_its_replay_buffer(workdir):
    """USR1 (SLURM's warning before the time limit) stops the run with a resume file holding the networks,
    optimiser, RNG and replay buffer; the same command continues it from the same global step, without new demos,
    and every step is logged once."""
    flags = [*TINY, "--total-timesteps", "60", "--run-name", "r", "--checkpoint-minutes", "0",
             "--progress-interval", "0", "--log-frequency", "1"]
    stop_with_signal(SCRIPT, *flags, "--model", "cnn", cwd=workdir, at="step 30/")
    saved = torch.load(os.path.join(workdir, "runs", "r", "resume.pt"), weights_only=False)
    assert saved["counters"]["global_step"] >= 30
    assert set(saved["state"]) == {"q_network", "target_network", "optimizer", "replay_buffer"}
    assert saved["state"]["replay_buffer"]["valid"].sum() > 30  # the demo + agent steps

    resumed = run_script(SCRIPT, *flags, "--model", "cnn", cwd=workdir)
    assert f"resuming runs/r from global step {saved['counters']['global_step']}" in resumed.stdout
    assert "demo episodes" not in resumed.stdout  # the demos came back with the buffer
    scalars = read_scalars(os.path.join(workdir, "runs", "r"))
    steps = [step for step, _ in scalars["charts/gradient_steps"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # increasing, each step once, to the end
    gradient_steps = [int(v) for _, v in scalars["charts/gradient_steps"]]
    assert gradient_steps == list(range(gradient_steps[0], gradient_steps[0] + len(gradient_steps)))  # no gap

    proc = run_script(SCRIPT, *flags, "--model", "equi", cwd=workdir, check=False)
    script_fails_with(proc, "--model")


def test_parameter_counts_match_the_paper():
    """At the paper's size (n_hidden 128, 128 px): Equi DQN 2.6M and CNN DQN 3.9M parameters, exactly the counts of
    the released networks."""
    from cleanrl_equi.equivariant import count_parameters

    assert count_parameters(dqn.EquiQNetwork(dqn.Args())) == 2_622_914
    assert count_parameters(dqn.CNNQNetwork(dqn.Args(model="cnn"))) == 3_937_330
    assert dqn.layer_plan(128, 128) == [(16, 1, True), (32, 1, True), (64, 1, True), (128, 1, True), (256, 1, False),
                                        (256, 0, True)]
