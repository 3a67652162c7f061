"""The playfield crop makes the 84x84 frame's flip the game's mirror: on real emulator frames, for every game of the
symmetry table, the player's reachable range and the median background map onto themselves; both back-ends crop.

Self-contained on purpose (no conftest helpers): emulator measurements are cached per module to keep it fast.
"""

import gymnasium as gym
import numpy as np
import pytest

from cleanrl_equi.envs.atari import MIRROR_SYMMETRIES, MirrorSymmetry, make_atari_envs, playfield_frame

GAMES = sorted(MIRROR_SYMMETRIES)

# no-op frames before the player answers the joystick (some games play an intro first)
WARM_UP_FRAMES = {"BeamRider": 300, "Carnival": 1000}


def _flip(frame, symmetry):
    return np.flip(frame, symmetry.flip_dim())


def _mirror_error(frame, symmetry) -> float:
    """Mean absolute grey-level difference between a frame (..., 84, 84) and its mirror."""
    frame = frame.astype(np.float64)
    return float(np.abs(frame - _flip(frame, symmetry)).mean())


# ------------------------------------------------------------------------------------------------------------------
# The median background of random play, as the agent sees it
# ------------------------------------------------------------------------------------------------------------------
_backgrounds = {}


def _median_background(game, crop, num_envs=4, steps=600):
    """Median over the newest stacked frames of uniformly random play in the native back-end; long enough that
    formations of enemies (SpaceInvaders) have moved on."""
    if (game, crop) not in _backgrounds:
        envs = make_atari_envs(f"{game}NoFrameskip-v4", num_envs, backend="ale", playfield_crop=crop)
        obs, _ = envs.reset(seed=0)
        rng = np.random.default_rng(0)
        frames = []
        for _ in range(steps):
            obs, *_ = envs.step(rng.integers(0, envs.single_action_space.n, size=num_envs))
            frames.append(obs[:, -1])
        envs.close()
        _backgrounds[game, crop] = np.median(np.concatenate(frames), axis=0)
    return _backgrounds[game, crop]


@pytest.fixture(scope="module")
def breakout_today():
    """What the mirror costs Breakout without the crop (its score and lives are not symmetric): the bar every game
    must meet with the crop. benchmarks/atari_mirror_axes.py measured 2.7 grey levels."""
    return _mirror_error(_median_background("Breakout", crop=False), MIRROR_SYMMETRIES["Breakout"])


@pytest.mark.parametrize("game", GAMES)
def test_cropped_background_mirrors_onto_itself(game, breakout_today):
    symmetry = MIRROR_SYMMETRIES[game]
    error = _mirror_error(_median_background(game, crop=True), symmetry)
    if symmetry.approximate is None:
        assert error <= breakout_today + 0.1, f"{game}: {error:.2f} vs Breakout's {breakout_today:.2f} today"
    else:  # the mark stays honest: within its recorded error, and still worse than the bar
        assert breakout_today < error <= symmetry.approximate * 1.2, f"{game}: {error:.2f}"


def test_pong_crop_removes_the_off_centre_walls():
    """Pong's walls are 9 rows below the screen's centre: uncropped, its mirror misses by a whole wall."""
    pong = MIRROR_SYMMETRIES["Pong"]
    assert _mirror_error(_median_background("Pong", crop=False), pong) > 20
    assert _mirror_error(_median_background("Pong", crop=True), pong) < 0.5


# ------------------------------------------------------------------------------------------------------------------
# The player's reachable range
# ------------------------------------------------------------------------------------------------------------------
class _Game:
    def __init__(self, game):
        self.symmetry = MIRROR_SYMMETRIES[game]
        self.env = gym.make(f"{game}NoFrameskip-v4", repeat_action_probability=0.0)
        self.env.reset(seed=0)
        self.ale = self.env.unwrapped.ale
        self.meanings = list(self.env.unwrapped.get_action_meanings())
        self.ale_actions = self.env.unwrapped._action_set
        self.dim = 1 if self.symmetry.axis == "left-right" else 0  # raw screen dimension the mirror reverses
        self.act("NOOP", WARM_UP_FRAMES.get(game, 100))
        self.start, self.lives = self.ale.cloneState(), self.ale.lives()

    def act(self, meaning, frames):
        for _ in range(frames):
            self.ale.act(self.ale_actions[self.meanings.index(meaning)])

    def screen_after(self, state, meaning, frames):
        self.ale.restoreState(state)
        self.act(meaning, frames)
        return self.ale.getScreenGrayscale()

    def player_lines(self):
        """Mask of the raw lines (rows; Pong: columns) the player occupies: where moving either way first differs
        (later, enemies that aim at the player differ too); the densest run of them."""
        word_a, word_b = self.symmetry.swap
        for frames in (4, 8, 16, 24, 40):
            changed = self.screen_after(self.start, word_a, frames) != self.screen_after(self.start, word_b, frames)
            counts = changed.sum(axis=self.dim)
            lines = np.flatnonzero(counts)
            if len(lines):
                break
        runs = np.split(lines, np.flatnonzero(np.diff(lines) > 3) + 1)
        run = max(runs, key=lambda r: counts[r].sum())
        mask = np.zeros(len(counts), dtype=bool)
        mask[run[0] : run[-1] + 1] = True
        return mask

    def edge(self, toward, away, low, preprocess, lines):
        """The player's outer edge (along the mirror) at the wall it reaches holding `toward`, in the frames that
        `preprocess` makes: the first (`low`) or last position where standing still and moving `away` differ.
        Trials where a life was lost or the whole screen changed (a flash) are dropped; the most extreme edge two
        trials agree on wins (a hold too short to reach the wall gives a less extreme one)."""
        keep = lines[:, None] if self.dim == 1 else lines[None, :]
        edges = []
        for hold in (100, 200, 300, 400):
            self.ale.restoreState(self.start)
            self.act(toward, hold)
            at_wall = self.ale.cloneState()
            for frames in (16, 24):
                still = preprocess(self.screen_after(at_wall, "NOOP", frames) * keep)
                moved = preprocess(self.screen_after(at_wall, away, frames) * keep)
                if self.ale.lives() != self.lives or self.ale.game_over():
                    continue
                positions = np.flatnonzero((still != moved).any(axis=1 - self.dim))
                if len(positions) and positions[-1] - positions[0] < 0.75 * still.shape[self.dim]:
                    edges.append(positions[0] if low else positions[-1])
        values, counts = np.unique(edges, return_counts=True)
        agreed = values[counts >= 2]
        return int(agreed.min() if low else agreed.max())

    def range_(self, preprocess):
        """(low edge, high edge) of the player's reachable range, in the frames `preprocess` makes."""
        # toward low indices: LEFT moves left; Pong's RIGHT moves the paddle up (tests/test_atari.py checks both)
        low_word = "RIGHT" if self.dim == 0 else "LEFT"
        high_word = [w for w in self.symmetry.swap if w != low_word][0]
        lines = self.player_lines()
        return (
            self.edge(low_word, high_word, True, preprocess, lines),
            self.edge(high_word, low_word, False, preprocess, lines),
        )


_ranges = {}


def _player_range(game, frames):
    """The player's reachable range (low edge, high edge) in the frames the agent sees with the crop ("cropped"),
    without it ("uncropped"), or in raw-screen pixels ("raw")."""
    if game not in _ranges:
        g = _Game(game)
        size = g.ale.getScreenGrayscale().shape[g.dim]
        whole = MirrorSymmetry(g.symmetry.axis, g.symmetry.swap, centre=(size - 1) / 2, window=(0, size))
        _ranges[game] = {
            "cropped": g.range_(lambda s: playfield_frame(s, g.symmetry)),
            "uncropped": g.range_(lambda s: playfield_frame(s, whole)),
            "raw": g.range_(lambda s: s),
        }
        g.env.close()
    return _ranges[game][frames]


@pytest.mark.parametrize("game", GAMES)
def test_player_range_mirrors_onto_itself(game):
    """The mirror maps 84-px position i to 83 - i: the range's two edges must map onto each other, within a pixel."""
    low, high = _player_range(game, "cropped")
    assert abs(low + high - 83) <= 1, f"{game}: reachable range {low}-{high} mirrors to {83 - high}-{83 - low}"


@pytest.mark.parametrize("game", GAMES)
def test_table_axis_is_the_player_range_centre(game):
    """The table's axis is the centre of the raw reachable range, or half a pixel off it (where the static
    playfield is centred between two pixels and the player's sprite cannot be)."""
    low, high = _player_range(game, "raw")
    assert abs(MIRROR_SYMMETRIES[game].centre - (low + high) / 2) <= 0.5


SCREEN_CENTRE = {"left-right": 79.5, "top-bottom": 104.5}  # of the 210x160 raw screen
FAR_OFF_CENTRE = [g for g, s in MIRROR_SYMMETRIES.items() if abs(s.centre - SCREEN_CENTRE[s.axis]) >= 2.5]


@pytest.mark.parametrize("game", sorted(FAR_OFF_CENTRE))
def test_off_centre_games_need_the_crop(game):
    """The check has teeth: without the crop, games 2.5 or more raw pixels off centre miss by more than a pixel."""
    low, high = _player_range(game, "uncropped")
    assert abs(low + high - 83) > 1


# ------------------------------------------------------------------------------------------------------------------
# Both back-ends crop
# ------------------------------------------------------------------------------------------------------------------
def _first_frame(game, backend, crop):
    envs = make_atari_envs(f"{game}NoFrameskip-v4", 1, backend=backend, playfield_crop=crop)
    obs, _ = envs.reset(seed=0)
    envs.close()
    return obs[0, -1]


@pytest.mark.parametrize("backend", ["ale", "gym"])
def test_backend_crops_space_invaders_shields_onto_each_other(backend):
    """SpaceInvaders' three shields (84-px rows 63-69 at the start of a game) are centred on column 77.5 of the
    raw screen, 2 pixels left of its centre (the axis, 78.0, is half a pixel from them): only the cropped frame's
    flip lays them (nearly) onto each other."""
    symmetry = MIRROR_SYMMETRIES["SpaceInvaders"]
    shields = slice(62, 71)
    cropped = _first_frame("SpaceInvaders", backend, crop=True)[shields]
    uncropped = _first_frame("SpaceInvaders", backend, crop=False)[shields]
    assert cropped.max() > 50  # the shields are there
    assert _mirror_error(cropped, symmetry) < 0.4 * _mirror_error(uncropped, symmetry)  # 1 raw px off, not 4


def test_backends_crop_pong_alike():
    """Both back-ends keep the same rows: Pong's walls at both ends of the cropped frame, the same thickness. Row
    medians ignore the ball and paddles; the back-ends' grey levels differ by a few (grey before or after resize)."""
    for backend in ("ale", "gym"):
        rows = np.median(_first_frame("Pong", backend, crop=True), axis=1)
        assert rows[0] > 200 and rows[41] < 100  # a wall at the top, the field in the middle
        assert np.abs(rows - rows[::-1]).max() < 5, f"{backend}: {rows[:6]} vs {rows[::-1][:6]}"


def test_crop_of_a_centred_game_changes_nothing(monkeypatch):
    """Breakout's window is the whole screen, so make_atari_envs keeps the native resize; forced through the Python
    crop-resize-stack path, it must give the native observations bit for bit, across game ends (stacks restart with
    zeros, as the native stack does)."""
    from cleanrl_equi.envs import atari

    monkeypatch.setattr(atari, "crops_nothing", lambda *args: False)
    envs = [make_atari_envs("BreakoutNoFrameskip-v4", 2, backend="ale", playfield_crop=c) for c in (False, True)]
    assert isinstance(envs[1], atari.PlayfieldFrameStack) and not isinstance(envs[0], atari.PlayfieldFrameStack)
    observations = [e.reset(seed=0)[0] for e in envs]
    assert np.array_equal(*observations)
    rng = np.random.default_rng(0)
    games_ended = 0
    for _ in range(500):
        actions = rng.integers(0, 4, size=2)
        (obs_a, *_, info_a), (obs_b, *_) = (e.step(actions) for e in envs)
        assert np.array_equal(obs_a, obs_b)
        games_ended += int(np.sum(info_a.get("_episode", 0)))
    assert games_ended >= 1
    for e in envs:
        e.close()


def test_crop_of_a_game_without_axis_is_refused():
    with pytest.raises(ValueError, match="no measured mirror axis"):
        make_atari_envs("FreewayNoFrameskip-v4", 1, playfield_crop=True)
