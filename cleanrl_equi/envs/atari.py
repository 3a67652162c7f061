"""Atari environments for the PPO scripts: CleanRL's preprocessing on two back-ends, and the mirror-symmetry table.

Both back-ends give the agent the same thing (CleanRL's `ppo_atari.py`):

* observations: 4 stacked 84x84 grayscale frames, uint8, newest frame last;
* 4 emulator frames per action, the last two max-pooled; up to 30 no-op actions after a reset;
* FIRE pressed at the start of a game for games that need it;
* `reward` = sign of the game reward (what the agent learns from), and `terminated` on every lost life;
* `infos["episode"]["r"]` / `["l"]` with mask `infos["_episode"]`: the **raw full-game score** (all lives) and its
  length in emulator frames, set on the step a game ends — this is what `charts/episodic_return` logs.

`backend="ale"` (default) runs ale-py's native C++ vector env, stepping all games in parallel threads.
`backend="gym"` runs CleanRL's wrapper stack in gymnasium's vector env (sync, or async processes), and is the one
that can record videos. Both use "same-step" autoreset: the observation after a finished game is the first of
the next one, so no transition is wasted on a reset step.

The one difference: after a life is lost, the gym stack's FIRE reset presses FIRE (and one more action) inside
the reset, unseen by the agent; the native env has no such hook, so the next action of that env is replaced by
FIRE. The agent loses one decision per life; `tests/test_atari.py` checks that both back-ends relaunch the ball.

Optional `playfield_crop` (both back-ends): before the resize, crop the raw screen to a window symmetric about
the game's measured mirror line (`MIRROR_SYMMETRIES`), so that flipping the 84x84 frame about its centre, as the
equivariant agent does, is the game's mirror; most games' playfields are off the screen's centre by 2-9 pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ale_py
import cv2
import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

gym.register_envs(ale_py)
# ALE greets every new emulator with a banner on stderr, which would bury a script's one-sentence errors
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)

FRAME_SKIP = 4


# --------------------------------------------------------------------------------------------------------------
# Env ids
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AtariGame:
    """What the env id says: the game, and whether actions are sticky (v5 ids) or not (NoFrameskip-v4 ids)."""

    env_id: str
    name: str  # CamelCase game name, e.g. "SpaceInvaders"
    sticky_action_probability: float

    @property
    def rom(self) -> str:
        """ale-py's ROM name: SpaceInvaders -> space_invaders."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


def parse_atari_env_id(env_id: str) -> AtariGame:
    """Accept `<Game>NoFrameskip-v4` (CleanRL's default, no sticky actions) or `ALE/<Game>-v5` (sticky, 0.25).

    Raises ValueError with a one-sentence explanation for anything else.
    """
    match_v4 = re.fullmatch(r"([A-Za-z]+)NoFrameskip-v4", env_id)
    match_v5 = re.fullmatch(r"ALE/([A-Za-z]+)-v5", env_id)
    if not (match_v4 or match_v5):
        raise ValueError(
            f"{env_id!r} is not an Atari env id; use '<Game>NoFrameskip-v4' (e.g. BreakoutNoFrameskip-v4) "
            "or 'ALE/<Game>-v5'."
        )
    try:
        gym.spec(env_id)
    except gym.error.Error:
        raise ValueError(f"{env_id!r} is not a game that ale-py knows; check the spelling (e.g. BreakoutNoFrameskip-v4).")
    if match_v4:
        return AtariGame(env_id, match_v4.group(1), 0.0)
    return AtariGame(env_id, match_v5.group(1), 0.25)


def action_meanings(env_id: str) -> list[str]:
    """The game's minimal action set, e.g. ['NOOP', 'FIRE', 'RIGHT', 'LEFT'] for Breakout."""
    env = gym.make(env_id)
    try:
        return list(env.unwrapped.get_action_meanings())
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------------------
# Mirror symmetries
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MirrorSymmetry:
    """A mirror of the screen, the action swap that goes with it, and where the game's mirror line lies.

    axis: "left-right" reverses the image width (columns); "top-bottom" reverses the height (rows).
    swap: the two words of action names that exchange under the mirror, e.g. ("RIGHT", "LEFT").
    centre: the game's mirror line in raw-screen pixel indices (the 210x160 screen; Carnival's is 214x160) along the
        mirrored dimension: the game's mirror maps pixel i to pixel 2 * centre - i. The screen's own centre is 79.5
        (columns) or 104.5 (rows); most games' playfields are off it, so flipping the whole resized frame is not
        the game's mirror.
    window: the raw pixels [start, stop) along the mirrored dimension that `playfield_crop` keeps (the other
        dimension is kept whole). Symmetric about `centre` (start + stop - 1 == 2 * centre), so that after the resize
        to 84x84, flipping the frame about its centre is the game's mirror.
    approximate: None if, after the crop, the mirror maps the player's reachable range onto itself (within one
        84-px pixel) and the game's median background onto itself as well as Breakout's maps today (uncropped);
        otherwise the error that stays: the mean absolute difference (grey levels) between the 84x84 median
        background and its mirror, with the table saying what causes it. tests/test_atari_mirror.py checks both.
    """

    axis: str
    swap: tuple[str, str]
    centre: float
    window: tuple[int, int]
    approximate: float | None = None

    def __post_init__(self):
        start, stop = self.window
        if start + stop - 1 != 2 * self.centre:
            raise ValueError(f"window {self.window} is not symmetric about {self.centre}")

    def action_permutation(self, meanings: list[str]) -> list[int]:
        """perm[i] = index of the action that mirrors action i (an involution)."""
        a, b = self.swap
        placeholder = "\0"
        mirrored = [m.replace(a, placeholder).replace(b, a).replace(placeholder, b) for m in meanings]
        missing = [m for m in mirrored if m not in meanings]
        if missing:
            raise ValueError(f"mirrored actions {missing} are not in the action set {meanings}")
        return [meanings.index(m) for m in mirrored]

    def flip_dim(self) -> int:
        """The tensor dimension (of an N x C x H x W batch) that the mirror reverses."""
        return -1 if self.axis == "left-right" else -2

    def crop(self, screen: np.ndarray) -> np.ndarray:
        """The window of a raw screen (H x W, or H x W x C), as a view."""
        start, stop = self.window
        return screen[start:stop] if self.axis == "top-bottom" else screen[:, start:stop]


def playfield_frame(screen: np.ndarray, symmetry: MirrorSymmetry) -> np.ndarray:
    """A raw screen as the agent sees it with `playfield_crop`: the window, resized to 84x84 with OpenCV's area
    interpolation (what both back-ends use), so the frame's centre column (or row) is the game's mirror line."""
    return cv2.resize(symmetry.crop(screen), (84, 84), interpolation=cv2.INTER_AREA)


# Axes measured on the emulator by benchmarks/atari_mirror_axes.py (results: benchmarks/results/atari_mirror_axes.json
# and .png), in raw-screen pixels: each game's player is driven into both walls with its move actions, and the axis
# is the centre of its reachable range; the static features of the median background of random play cross-check
# it. In BeamRider they differ by half a pixel (its odd-width ship cannot be centred on the line between two pixels
# that its beams are centred on); the beams win there, and the ship's range maps onto itself within 0.6 px of the
# 84x84 frame. The window is the widest inside the screen symmetric about the axis, except Pong's.
# Breakout's median background, uncropped, differs from its mirror by 2.7 grey levels on average (its score and
# lives); the crop brings every game but Carnival to that or better. Carnival is approximate: its playfield and
# gun are centred, but its HUD (score and bonus display centred on column 83.5, an ammunition bar from the left,
# a bonus bar on the right) leaves 3.6.
# tests/test_atari.py checks that the mirrored action moves the player the mirrored way; tests/test_atari_mirror.py
# that the crop maps the player's range and the median background onto themselves.
# Pong's paddles move vertically: its RIGHT/LEFT actions move the paddle up/down, so its mirror is top-bottom.
MIRROR_SYMMETRIES: dict[str, MirrorSymmetry] = {
    # paddle columns 8-151 between the walls at 0-7 and 152-159: centred
    "Breakout": MirrorSymmetry("left-right", ("RIGHT", "LEFT"), centre=79.5, window=(0, 160)),
    # paddle rows 34-193 between the walls at rows 24-33 and 194-209. The widest window (rows 18-209) would take in
    # part of the score and the bottom wall's 6 extra rows; rows 24-203 keep 10 rows of each wall, not the score.
    "Pong": MirrorSymmetry("top-bottom", ("RIGHT", "LEFT"), centre=113.5, window=(24, 204)),
    # cannon columns 34-122. The shields (columns 42-49, 74-81, 106-113) are centred on 77.5, and the full alien
    # formation sweeps columns 22-136 (centre 79.0): their mirrors land 0.5 and 1.1 px (84-px frame) off them.
    "SpaceInvaders": MirrorSymmetry("left-right", ("RIGHT", "LEFT"), centre=78.0, window=(0, 157)),
    # beams and horizon line (columns 8-159) centred on 83.5; the 15-px ship's columns 26-142 (centre 84.0)
    "BeamRider": MirrorSymmetry("left-right", ("RIGHT", "LEFT"), centre=83.5, window=(8, 160)),
    # cannon columns 25-141; the background (ground) spans the whole width
    "DemonAttack": MirrorSymmetry("left-right", ("RIGHT", "LEFT"), centre=83.0, window=(7, 160)),
    # ship columns 12-142; the background (ground) spans the whole width
    "Phoenix": MirrorSymmetry("left-right", ("RIGHT", "LEFT"), centre=77.0, window=(0, 155)),
    # gun columns 8-151: centred. Approximate: the HUD (see above).
    "Carnival": MirrorSymmetry("left-right", ("RIGHT", "LEFT"), centre=79.5, window=(0, 160), approximate=3.6),
}


def mirror_symmetry(env_id: str) -> MirrorSymmetry:
    """The game's mirror symmetry; ValueError (one sentence) for a game without a known one."""
    game = parse_atari_env_id(env_id)
    if game.name not in MIRROR_SYMMETRIES:
        known = ", ".join(sorted(MIRROR_SYMMETRIES))
        raise ValueError(
            f"{game.name} has no known mirror symmetry; ppo_atari_equi.py supports {known} "
            "(add an entry to cleanrl_equi/envs/atari.py:MIRROR_SYMMETRIES after checking it), or use ppo_atari.py."
        )
    return MIRROR_SYMMETRIES[game.name]


# --------------------------------------------------------------------------------------------------------------
# gym back-end: CleanRL's wrapper stack, written for gymnasium 1.x
# --------------------------------------------------------------------------------------------------------------
class NoopReset(gym.Wrapper):
    """Start each game with a random number (1..noop_max) of no-ops, so games do not all begin alike."""

    def __init__(self, env: gym.Env, noop_max: int = 30):
        super().__init__(env)
        self.noop_max = noop_max

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.np_random.integers(1, self.noop_max + 1)):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """Repeat the action for `skip` frames; observe the max of the last two (Atari sprites flicker)."""

    def __init__(self, env: gym.Env, skip: int = FRAME_SKIP):
        super().__init__(env)
        self.skip = skip
        self.frames = np.zeros((2, *env.observation_space.shape), dtype=env.observation_space.dtype)

    def step(self, action):
        total_reward, terminated, truncated, info = 0.0, False, False, {}
        for i in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if i >= self.skip - 2:
                self.frames[i - (self.skip - 2)] = obs
            total_reward += float(reward)
            if terminated or truncated:
                break
        return self.frames.max(axis=0), total_reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """Signal `terminated` on every lost life (a strong learning signal) but reset the game only when it is over."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:  # a life was lost: carry on with the same game
            obs, _, _, _, info = self.env.step(0)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE (then the next action) at every reset: games like Breakout wait for it before play starts."""

    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                self.env.reset(**kwargs)
        return obs, info


class CropPlayfield(gym.ObservationWrapper):
    """Keep the game's window about its mirror line (before the resize), so that the resized frame's centre is the
    game's mirror line."""

    def __init__(self, env: gym.Env, symmetry: MirrorSymmetry):
        super().__init__(env)
        self.symmetry = symmetry
        shape = symmetry.crop(np.zeros(env.observation_space.shape, np.uint8)).shape
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)

    def observation(self, observation):
        return np.ascontiguousarray(self.symmetry.crop(observation))


class SignReward(gym.RewardWrapper):
    """Learn from the sign of the reward, so one set of hyperparameters fits games with very different scores."""

    def reward(self, reward):
        return float(np.sign(reward))


def make_gym_env(env_id: str, idx: int, capture_video: bool, run_name: str, playfield_crop: bool = False):
    """A thunk building one env with CleanRL's wrapper order (innermost first) for gymnasium's vector envs;
    `playfield_crop` crops the screen to the game's window (MirrorSymmetry.window) before the resize."""
    game = parse_atari_env_id(env_id)
    symmetry = playfield_symmetry(env_id) if playfield_crop else None

    def thunk():
        kwargs = {"frameskip": 1, "repeat_action_probability": game.sticky_action_probability}
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array", **kwargs)
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        else:
            env = gym.make(env_id, **kwargs)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # innermost: the raw score of the whole game
        env = NoopReset(env, noop_max=30)
        env = MaxAndSkip(env, skip=FRAME_SKIP)
        env = EpisodicLife(env)
        if "FIRE" in env.unwrapped.get_action_meanings():
            env = FireReset(env)
        env = SignReward(env)
        if symmetry is not None:
            env = CropPlayfield(env, symmetry)
        env = gym.wrappers.ResizeObservation(env, (84, 84))
        env = gym.wrappers.GrayscaleObservation(env)
        env = gym.wrappers.FrameStackObservation(env, 4)
        return env

    return thunk


class LiftEpisodeStatistics(gym.vector.VectorWrapper):
    """With same-step autoreset, gymnasium puts the finished episode's statistics under `final_info`; lift them to
    `infos["episode"]` / `infos["_episode"]`, where the native back-end puts them, so the training loop reads one place."""

    def step(self, actions):
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        final_info = infos.pop("final_info", {})
        infos.pop("_final_info", None)
        infos.pop("final_obs", None)
        infos.pop("_final_obs", None)
        if "episode" in final_info:
            infos["episode"] = final_info["episode"]
            infos["_episode"] = final_info["_episode"]
        return obs, rewards, terminations, truncations, infos


# --------------------------------------------------------------------------------------------------------------
# ale back-end: ale-py's native vector env, adapted to the same contract
# --------------------------------------------------------------------------------------------------------------
class NativeAtariGames(gym.vector.VectorWrapper):
    """Adapt `ale_py.vector_env.AtariVectorEnv` (run with raw rewards and life-loss signals) to CleanRL's contract:
    sign-clipped rewards for learning, the raw score of each whole game in `infos["episode"]`, and FIRE pressed
    after each lost life in games that need it."""

    def __init__(self, env: gym.vector.VectorEnv, has_fire: bool):
        super().__init__(env)
        self.has_fire = has_fire
        self.scores = np.zeros(self.num_envs, dtype=np.float64)
        self.frames = np.zeros(self.num_envs, dtype=np.int64)
        self.episode_frame_number = np.zeros(self.num_envs, dtype=np.int64)
        self.press_fire = np.zeros(self.num_envs, dtype=bool)

    def reset(self, **kwargs):
        obs, infos = self.env.reset(**kwargs)
        self.scores[:] = 0
        self.frames[:] = 0
        self.episode_frame_number = infos["episode_frame_number"].astype(np.int64)
        self.press_fire[:] = False
        return obs, infos

    def step(self, actions):
        actions = np.where(self.press_fire, 1, np.asarray(actions)).astype(np.int64)
        obs, raw_rewards, terminations, truncations, infos = self.env.step(actions)
        self.scores += raw_rewards
        self.frames += FRAME_SKIP
        # With same-step autoreset a finished game is replaced at once; its frame counter then starts again.
        frame_number = infos["episode_frame_number"].astype(np.int64)
        game_over = truncations | (terminations & (frame_number < self.episode_frame_number))
        self.episode_frame_number = frame_number
        if game_over.any():
            infos["episode"] = {"r": np.where(game_over, self.scores, 0.0), "l": np.where(game_over, self.frames, 0)}
            infos["_episode"] = game_over
            self.scores[game_over] = 0
            self.frames[game_over] = 0
        self.press_fire = self.has_fire & terminations & ~game_over
        infos.pop("final_obs", None)
        return obs, np.sign(raw_rewards).astype(np.float32), terminations, truncations, infos


class PlayfieldFrameStack(gym.vector.VectorWrapper):
    """The native env's frame stack, redone on full-resolution frames so they can be cropped first.

    Wraps `NativeAtariGames` over a native env run at the raw screen size with a 1-frame "stack" (ale-py 0.12.1 can
    resize but not crop). Each new screen is cropped to the game's window and resized like the native env does
    (`playfield_frame`), and the last `stack_num` are stacked, newest last, with zeros before a game's first frame
    as in the native stack: with a whole-screen window the observations are the native env's, bit for bit.
    """

    def __init__(self, env: gym.vector.VectorEnv, symmetry: MirrorSymmetry, stack_num: int = 4):
        super().__init__(env)
        self.symmetry = symmetry
        self.frames = np.zeros((self.num_envs, stack_num, 84, 84), dtype=np.uint8)
        self.single_observation_space = gym.spaces.Box(0, 255, self.frames.shape[1:], np.uint8)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)

    def _push(self, screens: np.ndarray, new_game: np.ndarray) -> np.ndarray:
        self.frames[new_game] = 0
        self.frames[:, :-1] = self.frames[:, 1:]
        for i in range(self.num_envs):
            self.frames[i, -1] = playfield_frame(screens[i, -1], self.symmetry)
        return self.frames.copy()

    def reset(self, **kwargs):
        screens, infos = self.env.reset(**kwargs)
        return self._push(screens, np.ones(self.num_envs, dtype=bool)), infos

    def step(self, actions):
        screens, rewards, terminations, truncations, infos = self.env.step(actions)
        # same-step autoreset: a finished game's env already shows the next game's first screen
        new_game = infos.get("_episode", np.zeros(self.num_envs, dtype=bool))
        return self._push(screens, new_game), rewards, terminations, truncations, infos


def crops_nothing(symmetry: MirrorSymmetry, screen_height: int, screen_width: int) -> bool:
    """Whether the symmetry's window is the whole screen along its axis (the game is centred on the screen)."""
    return symmetry.window == (0, screen_width if symmetry.axis == "left-right" else screen_height)


def playfield_symmetry(env_id: str) -> MirrorSymmetry:
    """The symmetry whose window `playfield_crop` uses; ValueError (one sentence) for a game without one."""
    game = parse_atari_env_id(env_id)
    if game.name not in MIRROR_SYMMETRIES:
        known = ", ".join(sorted(MIRROR_SYMMETRIES))
        raise ValueError(f"{game.name} has no measured mirror axis to crop about; the playfield crop supports {known}.")
    return MIRROR_SYMMETRIES[game.name]


def make_atari_envs(
    env_id: str,
    num_envs: int,
    backend: str = "ale",
    capture_video: bool = False,
    run_name: str = "",
    async_envs: bool = False,
    num_threads: int = 0,
    *,
    playfield_crop: bool = False,
) -> gym.vector.VectorEnv:
    """The vector env for PPO: `backend` "ale" (native, threaded) or "gym" (CleanRL's wrappers; can record video).

    Seed it with `envs.reset(seed=...)`; observations are uint8 arrays of shape (num_envs, 4, 84, 84).

    `playfield_crop`: crop each raw screen to the game's window about its mirror line (`MIRROR_SYMMETRIES`) before
    the resize, so that flipping the 84x84 frame about its centre is the game's mirror (what the equivariant agent
    assumes). ValueError for a game without a measured axis. The native back-end then returns full-resolution
    frames and crops, resizes and stacks them in Python (`PlayfieldFrameStack`).
    """
    game = parse_atari_env_id(env_id)
    symmetry = playfield_symmetry(env_id) if playfield_crop else None
    if backend == "ale":
        env = gym.make(env_id)
        meanings = list(env.unwrapped.get_action_meanings())
        screen_height, screen_width = env.observation_space.shape[:2]
        env.close()
        if symmetry is not None and crops_nothing(symmetry, screen_height, screen_width):
            symmetry = None  # Breakout, Carnival: the native threaded resize gives the same frames, faster
        native = ale_py.vector_env.AtariVectorEnv(
            game.rom,
            num_envs,
            num_threads=num_threads,
            repeat_action_probability=game.sticky_action_probability,
            autoreset_mode=AutoresetMode.SAME_STEP,
            frameskip=FRAME_SKIP,
            maxpool=True,
            noop_max=30,
            episodic_life=False,
            life_loss_info=True,
            reward_clipping=False,
            use_fire_reset=True,
            # the native env resizes but cannot crop: with the crop, take whole screens and do the rest in Python
            img_height=84 if symmetry is None else screen_height,
            img_width=84 if symmetry is None else screen_width,
            grayscale=True,
            stack_num=4 if symmetry is None else 1,
        )
        envs = NativeAtariGames(native, has_fire="FIRE" in meanings)
        return envs if symmetry is None else PlayfieldFrameStack(envs, symmetry)
    if backend == "gym":
        thunks = [make_gym_env(env_id, i, capture_video, run_name, playfield_crop) for i in range(num_envs)]
        vector_cls = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
        return LiftEpisodeStatistics(vector_cls(thunks, autoreset_mode=AutoresetMode.SAME_STEP))
    raise ValueError(f"unknown Atari back-end {backend!r}; use 'ale' or 'gym'.")
