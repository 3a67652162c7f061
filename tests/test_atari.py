"""The Atari pieces: the mirror-symmetry table against the real emulator, the equivariance of the PPO agent on
real frames, the two vector-env back-ends, and the two PPO scripts end to end."""

import glob
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from cleanrl_equi.envs.atari import MIRROR_SYMMETRIES, action_meanings, make_atari_envs, mirror_symmetry
from conftest import load_script, max_equivariance_error, only_run_dir, read_scalars, run_script, script_fails_with

ppo_atari = load_script("ppo_atari")
ppo_atari_equi = load_script("ppo_atari_equi")

GAMES = sorted(MIRROR_SYMMETRIES)


# ------------------------------------------------------------------------------------------------------------------
# The symmetry table matches the games
# ------------------------------------------------------------------------------------------------------------------
def _screen_after(ale, state, action, frames):
    ale.restoreState(state)
    for _ in range(frames):
        ale.act(action)
    return ale.getScreenGrayscale().astype(np.int64)


def _displacement(ale, state, noop, action, axis, frames=12):
    """How far `action` moves what it moves along `axis` (pixels), compared with doing nothing from the same state:
    the mean position of the pixels it draws minus that of the pixels it erases."""
    moved, still = _screen_after(ale, state, action, frames), _screen_after(ale, state, noop, frames)
    changed = moved != still
    if not changed.any():
        return 0.0
    values, counts = np.unique(np.concatenate([moved[changed], still[changed]]), return_counts=True)
    background = values[counts.argmax()]
    drawn = np.argwhere(changed & (moved != background))
    erased = np.argwhere(changed & (still != background))
    if len(drawn) == 0 or len(erased) == 0:
        return float("nan")
    return float(drawn[:, axis].mean() - erased[:, axis].mean())


# frames of no-ops before the player can move (some games start late)
WARM_UP_FRAMES = {"BeamRider": 300, "Carnival": 1000}


def _without(meaning, word):
    """The action that does the same but without moving: RIGHTFIRE -> FIRE, UPRIGHT -> UP, RIGHT -> NOOP."""
    return meaning.replace(word, "") or "NOOP"


@pytest.mark.parametrize("game", GAMES)
def test_mirrored_action_moves_the_player_the_mirrored_way(game):
    env_id = f"{game}NoFrameskip-v4"
    symmetry = mirror_symmetry(env_id)
    meanings = action_meanings(env_id)
    permutation = symmetry.action_permutation(meanings)
    env = gym.make(env_id)
    env.reset(seed=0)
    ale, ale_actions = env.unwrapped.ale, env.unwrapped._action_set
    word_a, word_b = symmetry.swap
    # let the game start, then bring the player away from the walls
    for action, frames in ((0, WARM_UP_FRAMES.get(game, 100)), (meanings.index(word_a), 60), (meanings.index(word_b), 30)):
        for _ in range(frames):
            ale.act(ale_actions[action])
    state = ale.cloneState()
    axis = 1 if symmetry.axis == "left-right" else 0  # screen columns or rows
    swapped_pairs = [(a, b) for a, b in enumerate(permutation) if a < b]
    assert swapped_pairs, f"{game}: the mirror swaps no actions"
    for a, b in swapped_pairs:
        # compare with the same action minus the move, so a shot fired by RIGHTFIRE does not count as motion
        still_a = ale_actions[meanings.index(_without(_without(meanings[a], word_a), word_b))]
        still_b = ale_actions[meanings.index(_without(_without(meanings[b], word_a), word_b))]
        shift_a = _displacement(ale, state, still_a, ale_actions[a], axis)
        shift_b = _displacement(ale, state, still_b, ale_actions[b], axis)
        assert abs(shift_a) > 1 and abs(shift_b) > 1, f"{game}: {meanings[a]}/{meanings[b]} did not move the player"
        assert np.sign(shift_a) == -np.sign(shift_b), (
            f"{game}: {meanings[a]} moves {shift_a:+.1f} px and its mirror {meanings[b]} moves {shift_b:+.1f} px"
        )
    env.close()


def test_pong_right_moves_the_paddle_up():
    """Pong's RIGHT/LEFT move the paddle vertically: the reason its mirror is top-bottom."""
    env = gym.make("PongNoFrameskip-v4")
    env.reset(seed=0)
    ale, ale_actions = env.unwrapped.ale, env.unwrapped._action_set
    for _ in range(100):
        ale.act(ale_actions[0])
    state = ale.cloneState()
    assert _displacement(ale, state, ale_actions[0], ale_actions[2], axis=0) < -1  # RIGHT: rows decrease (up)
    assert abs(_displacement(ale, state, ale_actions[0], ale_actions[2], axis=1)) < 1  # and not sideways
    env.close()


def test_game_without_symmetry_is_refused():
    with pytest.raises(ValueError, match="no known mirror symmetry"):
        mirror_symmetry("FreewayNoFrameskip-v4")


# ------------------------------------------------------------------------------------------------------------------
# Exact equivariance of the PPO agent on real frames
# ------------------------------------------------------------------------------------------------------------------
def _real_frames(env_id, n=6, steps=40):
    envs = make_atari_envs(env_id, n, backend="ale")
    obs, _ = envs.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        obs, *_ = envs.step(rng.integers(0, envs.single_action_space.n, size=n))
    envs.close()
    return torch.as_tensor(obs)


@pytest.mark.parametrize("game", GAMES)
def test_equi_agent_is_exactly_equivariant_on_real_frames(game):
    env_id = f"{game}NoFrameskip-v4"
    torch.manual_seed(0)
    agent = ppo_atari_equi.Agent(ppo_atari_equi.Args(env_id=env_id))
    symmetry = mirror_symmetry(env_id)
    permutation = symmetry.action_permutation(action_meanings(env_id))
    frames = _real_frames(env_id)

    def logits_and_value(x):
        hidden = agent.network(agent.input(x / 255.0))
        logits = agent.actor(hidden).tensor.flatten(1)[:, agent.action_order]
        return torch.cat([logits, agent.get_value(x)], dim=1)

    mirror_frames = lambda x: torch.flip(x, [symmetry.flip_dim()])  # noqa: E731
    swap_actions = lambda y: y[:, permutation + [len(permutation)]]  # noqa: E731  (the value column stays)
    for mode in ("train", "eval"):  # eval mode uses escnn's cached filters: check them too
        agent.train(mode == "train")
        assert max_equivariance_error(logits_and_value, frames, [(mirror_frames, swap_actions)]) < 1e-5
        # the check has teeth: ignoring the action swap, or mirroring the wrong axis, breaks it
        assert max_equivariance_error(logits_and_value, frames, [(mirror_frames, lambda y: y)]) > 1e-4
        wrong_axis = lambda x: torch.flip(x, [-3 - symmetry.flip_dim()])  # noqa: E731
        assert max_equivariance_error(logits_and_value, frames, [(wrong_axis, swap_actions)]) > 1e-4
        # through the public method too: the log-probability of the swapped action of the mirrored frame
        _, logp, entropy, value = agent.get_action_and_value(frames, torch.zeros(len(frames), dtype=torch.long))
        swapped = torch.full((len(frames),), permutation[0])
        _, logp_m, entropy_m, value_m = agent.get_action_and_value(mirror_frames(frames), swapped)
        assert torch.allclose(logp, logp_m, atol=1e-5) and torch.allclose(value, value_m, atol=1e-5)
        assert torch.allclose(entropy, entropy_m, atol=1e-5)


def test_trunk_sizes_match_the_nature_cnn():
    plain = sum(p.numel() for p in ppo_atari.Agent(ppo_atari.Args(env_id="BreakoutNoFrameskip-v4")).parameters())
    equi = ppo_atari_equi.Agent(ppo_atari_equi.Args(env_id="BreakoutNoFrameskip-v4", trunk="params"))
    assert abs(sum(p.numel() for p in equi.parameters()) / plain - 1) < 0.05
    channel_matched = ppo_atari_equi.Agent(ppo_atari_equi.Args(trunk="channels"))
    widths = [m.out_type.size for m in channel_matched.network if hasattr(m, "kernel_size")]
    assert widths == [32, 64, 64, 512]


# ------------------------------------------------------------------------------------------------------------------
# The two back-ends give CleanRL's semantics
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ale", "gym"])
def test_backend_observations(backend):
    envs = make_atari_envs("BreakoutNoFrameskip-v4", 2, backend=backend)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    for _ in range(4):
        obs, *_ = envs.step(np.array([3, 2]))
    # the paddle (bottom rows) moved: newest frame last, and the left/right-moving envs differ
    assert not np.array_equal(obs[0, -1, 75:], obs[0, 0, 75:])
    assert not np.array_equal(obs[0, -1, 75:], obs[1, -1, 75:])
    envs.close()


def test_backends_draw_the_same_screen():
    """Same preprocessing (grayscale, resize, max-pool, stack) on both back-ends: after the same reset the bricks
    and walls (the static part of Breakout's screen) look the same to within resize interpolation."""
    screens = []
    for backend in ("ale", "gym"):
        envs = make_atari_envs("BreakoutNoFrameskip-v4", 1, backend=backend)
        obs, _ = envs.reset(seed=0)
        screens.append(obs[0, -1, 10:60].astype(np.float64))  # walls, score and bricks, not the paddle or ball
        envs.close()
    assert np.abs(screens[0] - screens[1]).mean() < 3.0


@pytest.mark.parametrize("backend", ["ale", "gym"])
def test_backend_fire_reset_lives_and_raw_score(backend):
    """Play Breakout with NOOP only: the ball is launched again after every lost life (FIRE reset), each life
    ends with `terminated`, rewards are clipped, and the logged score is the raw score of the whole game."""
    envs = make_atari_envs("BreakoutNoFrameskip-v4", 1, backend=backend)
    envs.reset(seed=0)
    terminations, rewards = 0, []
    for _ in range(3000):
        _, reward, terminated, truncated, infos = envs.step(np.array([0]))
        rewards.append(float(reward[0]))
        terminations += int(terminated[0])
        if infos.get("_episode", [False])[0]:
            break
    else:
        raise AssertionError(f"{backend}: a NOOP-only game never ended: the ball is not relaunched after a life")
    assert terminations == 5  # one per life
    assert set(rewards) <= {0.0, 1.0}
    assert infos["episode"]["r"][0] == sum(rewards)  # Breakout's first bricks are worth 1: raw == clipped here
    assert infos["episode"]["l"][0] > 4 * len(rewards) - 10  # length counts emulator frames, like CleanRL
    envs.close()


@pytest.mark.parametrize("backend", ["ale", "gym"])
def test_backend_logs_raw_score_but_learns_from_clipped_reward(backend):
    """SpaceInvaders aliens are worth 5-30 points: the logged score must be the raw one, the reward its sign."""
    envs = make_atari_envs("SpaceInvadersNoFrameskip-v4", 2, backend=backend)
    envs.reset(seed=1)
    rng = np.random.default_rng(0)
    clipped = np.zeros(2)
    for _ in range(5000):
        _, reward, _, _, infos = envs.step(rng.integers(0, 6, size=2))
        assert set(np.unique(reward)) <= {0.0, 1.0}
        clipped += reward
        if "_episode" in infos:
            i = int(np.flatnonzero(infos["_episode"])[0])
            assert infos["episode"]["r"][i] % 5 == 0
            assert infos["episode"]["r"][i] >= 5 * clipped[i] > 0
            break
    else:
        raise AssertionError("no SpaceInvaders game ended in 5000 steps")
    envs.close()


# ------------------------------------------------------------------------------------------------------------------
# The scripts, as a user runs them
# ------------------------------------------------------------------------------------------------------------------
TINY = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "256", "--num-minibatches", "2"]
SCALARS = [
    "charts/learning_rate",
    "charts/SPS",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
]


@pytest.mark.parametrize("script", ["ppo_atari.py", "ppo_atari_equi.py"])
def test_script_trains_saves_and_evaluates(script, workdir):
    stem = script[:-3]
    trained = run_script(script, *TINY, "--save-model", "--eval-episodes", "2", cwd=workdir)
    assert "over 2 games (actions sampled from the policy, evaluation seed 10001)" in trained.stdout
    assert "nan" not in trained.stdout  # before the first game ends the progress line says so, not "last return nan"
    run_dir = only_run_dir(workdir)
    scalars = read_scalars(run_dir)
    for tag in SCALARS:
        assert [step for step, _ in scalars[tag]] == [64, 128, 192, 256], tag
    assert len(scalars["eval/episodic_return"]) == 2
    assert all(0 <= value < 100 for _, value in scalars["eval/episodic_return"])
    model = os.path.join(run_dir, f"{stem}.cleanrl_model")
    evaluations = [run_script(script, "--eval-checkpoint", model, "--eval-episodes", "2", cwd=workdir).stdout
                   for _ in range(2)]
    assert "BreakoutNoFrameskip-v4: mean score" in evaluations[0] and "evaluation seed 10001" in evaluations[0]
    # the actions are sampled: the same command must sample the same ones (each game's score and length)
    resumable = os.path.join(run_dir, "resume.pt")  # the same weights: the same games
    evaluations.append(run_script(script, "--eval-checkpoint", resumable, "--eval-episodes", "2", cwd=workdir).stdout)
    games = [[line for line in stdout.splitlines() if line.startswith("eval game ")] for stdout in evaluations]
    assert len(games[0]) == 2 and games[0] == games[1] == games[2]


def test_capture_video(workdir):
    """Videos are written; extending the run (which records from episode 0 again into the same folder name) keeps
    the first part's videos aside instead of replacing them."""
    run_script("ppo_atari.py", *TINY, "--capture-video", "--run-name", "v", cwd=workdir)
    first = sorted(glob.glob(os.path.join(workdir, "videos", "v", "*.mp4")))
    assert first and all(os.path.getsize(v) > 1000 for v in first)
    sizes = [os.path.getsize(v) for v in first]
    longer = [flag if flag != "256" else "512" for flag in TINY]
    extended = run_script("ppo_atari.py", *longer, "--capture-video", "--run-name", "v", cwd=workdir)
    kept = os.path.join(workdir, "videos", "v-before-step-256")
    assert "kept in videos/v-before-step-256" in extended.stdout
    assert [os.path.getsize(os.path.join(kept, os.path.basename(v))) for v in first] == sizes
    assert glob.glob(os.path.join(workdir, "videos", "v", "*.mp4"))


def test_episode_scalars_are_logged(workdir):
    # Breakout games of a random agent end within ~250 agent steps
    run_script("ppo_atari.py", "--num-envs", "4", "--num-steps", "128", "--total-timesteps", "1024", cwd=workdir)
    scalars = read_scalars(only_run_dir(workdir))
    assert len(scalars["charts/episodic_return"]) >= 1
    assert all(value >= 0 for _, value in scalars["charts/episodic_return"])
    assert all(value > 100 for _, value in scalars["charts/episodic_length"])


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("ppo_atari.py", ["--env-id", "Breakout-v9"], "is not an Atari env id"),
        ("ppo_atari.py", ["--env-id", "BreakautNoFrameskip-v4"], "not a game that ale-py knows"),
        ("ppo_atari.py", ["--num-minibatches", "3"], "does not split into 3 minibatches"),
        ("ppo_atari.py", ["--eval-checkpoint", "missing.cleanrl_model"], "does not exist"),
        ("ppo_atari_equi.py", ["--env-id", "FreewayNoFrameskip-v4"], "no known mirror symmetry"),
    ],
)
def test_bad_input_stops_with_one_sentence(script, args, message, workdir):
    script_fails_with(run_script(script, *args, cwd=workdir, check=False), message)


@pytest.mark.parametrize(
    "script, flag, value, choices",
    [
        ("ppo_atari.py", "--env-backend", "envpool", ["ale", "gym"]),
        ("ppo_atari_equi.py", "--env-backend", "envpool", ["ale", "gym"]),
        ("ppo_atari_equi.py", "--trunk", "wide", ["channels", "params"]),
    ],
)
def test_a_choice_outside_the_list_is_refused_with_the_choices(script, flag, value, choices, workdir):
    """Enumerated flags are `Literal`s: tyro refuses another value before the script starts, naming the choices."""
    proc = run_script(script, flag, value, cwd=workdir, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert flag in proc.stderr and all(choice in proc.stderr for choice in choices), proc.stderr
    assert not os.path.exists(os.path.join(workdir, "runs"))


def test_checkpoint_of_other_script_or_corrupt_is_refused(workdir):
    run_script("ppo_atari.py", *TINY, "--save-model", "--eval-episodes", "1", cwd=workdir)
    model = os.path.join(only_run_dir(workdir), "ppo_atari.cleanrl_model")
    proc = run_script("ppo_atari_equi.py", "--eval-checkpoint", model, cwd=workdir, check=False)
    script_fails_with(proc, "written by ppo_atari, not ppo_atari_equi")
    corrupt = os.path.join(workdir, "corrupt.cleanrl_model")
    with open(corrupt, "wb") as f:
        f.write(b"not a checkpoint")
    proc = run_script("ppo_atari.py", "--eval-checkpoint", corrupt, cwd=workdir, check=False)
    script_fails_with(proc, "corrupt")
