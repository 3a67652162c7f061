"""Where each Atari game's mirror axis lies, measured on the emulator, and how well the playfield crop of
`cleanrl_equi.envs.atari` makes the mirror exact.

The equivariant PPO agent mirrors the 84x84 frame about its centre. That is the game's mirror only if the raw
screen's playfield is centred, which most games' are not. For every game of `MIRROR_SYMMETRIES` this script measures,
in raw-screen pixels (210x160; Carnival's screen is 214x160), along the mirrored dimension (columns for a
left-right mirror, rows for Pong's top-bottom one):

* the player's reachable range: the player is driven into each wall with the game's move action, then the screen
  after standing still is compared with the screen after moving away: the pixels that differ, in the player's band,
  start at the player's outer edge. Several hold lengths and move lengths are tried; the answer is the most extreme
  edge two of them agree on. The mirror axis is the centre of that range: the mirror about it maps raw pixel i to
  pixel 2 * axis - i.
* the static background: the median of many max-pooled frames (what the agent sees before the resize) of random
  play; its static features (walls, shields, beams, HUD) with their extents and centres, and the axes near the
  player's about which it is most symmetric (a cross-check of the player's axis).
* the error left in the 84x84 frame, without the crop (today's mirror about the frame centre) and with the table's
  crop: the mean absolute difference between the median background and its mirror, and where along the other
  dimension (HUD rows, playfield) it comes from; and how far the player's reachable range lands from itself.
* the speed cost of the crop in both back-ends (random actions, no network).

    uv run python benchmarks/atari_mirror_axes.py                      # writes the default output if it is absent
    uv run python benchmarks/atari_mirror_axes.py --overwrite          # re-measure and replace it
    uv run python benchmarks/atari_mirror_axes.py --games Pong --speed-steps 0 --out /tmp/pong.json

Results: benchmarks/results/atari_mirror_axes.json and, beside it, a .png of each game's median background (as the
agent sees it without and with the crop, mirrored, and the difference).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import cv2
import gymnasium as gym
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import REPO, Output, cli, companion, fail, machine_info, results_path  # noqa: E402

sys.path.insert(0, REPO)
from cleanrl_equi.envs.atari import FRAME_SKIP, MIRROR_SYMMETRIES, make_atari_envs, playfield_frame  # noqa: E402

# No-op frames before the player answers the joystick (some games play an intro first).
WARM_UP_FRAMES = {"BeamRider": 300, "Carnival": 1000}


@dataclass
class Args(Output):
    games: str = ""
    """comma-separated game names, e.g. 'Pong,Phoenix' (default: every game of MIRROR_SYMMETRIES)"""
    background_steps: int = 3000
    """agent steps (4 emulator frames each) of random play per game whose max-pooled frames make the median
    background"""
    seed: int = 0
    """seed of the random play and of the emulator"""
    speed_steps: int = 600
    """vector steps per throughput measurement of each back-end with and without the crop (0: skip the speed test)"""
    speed_envs: int = 8
    """number of envs in the throughput measurement"""
    speed_repeats: int = 3
    """alternating repeats of each throughput measurement (the median is reported)"""
    speed_game: str = "DemonAttack"
    """game of the throughput measurement (one whose crop is not the whole screen)"""
    png: bool = True
    """also write the PNG: per game the median background without crop, with the crop, its mirror, and their
    difference"""


# --------------------------------------------------------------------------------------------------------------
# The player's reachable range
# --------------------------------------------------------------------------------------------------------------
class Emulator:
    """One game's emulator (no frame skip, no sticky actions) with the game's minimal action set by name."""

    def __init__(self, game: str, seed: int):
        self.env = gym.make(f"{game}NoFrameskip-v4", repeat_action_probability=0.0)
        self.env.reset(seed=seed)
        self.ale = self.env.unwrapped.ale
        self.meanings = list(self.env.unwrapped.get_action_meanings())
        self.ale_actions = self.env.unwrapped._action_set

    def act(self, meaning: str, frames: int):
        action = self.ale_actions[self.meanings.index(meaning)]
        for _ in range(frames):
            self.ale.act(action)

    def screen_after(self, state, meaning: str, frames: int) -> np.ndarray:
        self.ale.restoreState(state)
        self.act(meaning, frames)
        return self.ale.getScreenGrayscale()


def largest_run(indices: np.ndarray, weights: np.ndarray, gap: int = 2) -> np.ndarray:
    """The run of nearly consecutive indices (holes up to `gap`) with the largest total weight."""
    runs = np.split(np.arange(len(indices)), np.flatnonzero(np.diff(indices) > gap + 1) + 1)
    best = max(runs, key=lambda run: weights[run].sum())
    return np.arange(indices[best[0]], indices[best[-1]] + 1)


def player_band(emu: Emulator, state, dim: int, word_a: str, word_b: str) -> np.ndarray:
    """The rows (left-right mirror) or columns (top-bottom) the player occupies: where moving one way and moving the
    other way from the same state first differ. The first frames count: later, enemies that aim at the player
    differ too."""
    for frames in (4, 8, 16, 24, 40, 60):
        changed = emu.screen_after(state, word_a, frames) != emu.screen_after(state, word_b, frames)
        counts = changed.sum(axis=dim)  # per line across the mirrored dimension
        lines = np.flatnonzero(counts)
        if len(lines):
            return largest_run(lines, counts[lines])
    raise RuntimeError("the move actions do not move anything")


def player_edge(
    emu: Emulator, state, dim: int, band: np.ndarray, toward: str, away: str, lives: int, low: bool
) -> dict:
    """The player's outer edge at the wall it reaches holding `toward` (the low-index wall if `low`): the first (or
    last) changed pixel, in the player's band, between standing still and moving `away` for a few frames.

    Trials that lost a life (the sprite may be an explosion) or whose changes span most of the screen (a flash)
    are dropped; a hold too short to reach the wall gives a less extreme edge. The answer is the most extreme edge
    that two trials agree on."""
    edges = []
    for hold in (100, 200, 300, 400):
        emu.ale.restoreState(state)
        emu.act(toward, hold)
        at_wall = emu.ale.cloneState()
        for frames in (16, 24):
            still = emu.screen_after(at_wall, "NOOP", frames)
            moved = emu.screen_after(at_wall, away, frames)
            if emu.ale.lives() != lives or emu.ale.game_over():
                continue
            changed = np.take(still != moved, band, axis=1 - dim)
            positions = np.flatnonzero(changed.any(axis=1 - dim))
            if len(positions) and positions[-1] - positions[0] < 0.75 * still.shape[dim]:
                edges.append(int(positions[0] if low else positions[-1]))
    if not edges:
        raise RuntimeError(f"no edge found holding {toward}")
    values, counts = np.unique(edges, return_counts=True)
    agreed = values[counts >= 2] if (counts >= 2).any() else values
    edge = int(agreed.min() if low else agreed.max())
    return {"edge": edge, "trials": edges}


def measure_player_range(game: str, seed: int) -> dict:
    symmetry = MIRROR_SYMMETRIES[game]
    dim = 1 if symmetry.axis == "left-right" else 0  # raw screen dimension that the mirror reverses
    emu = Emulator(game, seed)
    emu.act("NOOP", WARM_UP_FRAMES.get(game, 100))
    state, lives = emu.ale.cloneState(), emu.ale.lives()
    word_a, word_b = symmetry.swap
    band = player_band(emu, state, dim, word_a, word_b)
    # toward low indices: LEFT moves left; Pong's RIGHT moves the paddle up (tests/test_atari.py checks both)
    low_word = "RIGHT" if dim == 0 else "LEFT"
    high_word = word_b if low_word == word_a else word_a
    low = player_edge(emu, state, dim, band, low_word, high_word, lives, low=True)
    high = player_edge(emu, state, dim, band, high_word, low_word, lives, low=False)
    shape = emu.ale.getScreenGrayscale().shape
    emu.env.close()
    return {
        "dimension": "columns" if dim == 1 else "rows",
        "screen_shape": list(shape),
        "player_band": [int(band[0]), int(band[-1])],
        "low_edge": low,
        "high_edge": high,
        "range": [low["edge"], high["edge"]],
        "axis": (low["edge"] + high["edge"]) / 2,
        "frame_centre": (shape[dim] - 1) / 2,
    }


# --------------------------------------------------------------------------------------------------------------
# Enemies that sweep between walls of their own
# --------------------------------------------------------------------------------------------------------------
# game: (what, raw lines it moves in): their sweep is another measure of the playfield's axis
SWEEPS = {"SpaceInvaders": ("alien formation", (30, 150))}


def sweep_range(game: str, lines: tuple[int, int], seed: int, frames: int = 6000) -> dict:
    """The columns (rows for a top-bottom mirror) that anything drawn in `lines` reaches while the player does
    nothing, until the game ends."""
    emu = Emulator(game, seed)
    dim = 1 if MIRROR_SYMMETRIES[game].axis == "left-right" else 0
    low, high = None, None
    for _ in range(frames):
        emu.act("NOOP", 1)
        if emu.ale.game_over():
            break
        part = np.take(emu.ale.getScreenGrayscale(), np.arange(*lines), axis=1 - dim)
        drawn = np.flatnonzero((part > 0).any(axis=1 - dim))
        if len(drawn):
            low = drawn[0] if low is None else min(low, drawn[0])
            high = drawn[-1] if high is None else max(high, drawn[-1])
    emu.env.close()
    return {"lines": list(lines), "range": [int(low), int(high)], "centre": (int(low) + int(high)) / 2}


# --------------------------------------------------------------------------------------------------------------
# The static background
# --------------------------------------------------------------------------------------------------------------
def median_background(game: str, steps: int, seed: int) -> np.ndarray:
    """Median of max-pooled grayscale frames (the last two of each 4-frame action, as the agent sees them) of
    uniformly random play; the game restarts when it ends."""
    emu = Emulator(game, seed)
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(steps):
        action = emu.ale_actions[rng.integers(len(emu.ale_actions))]
        pooled = None
        for i in range(FRAME_SKIP):
            emu.ale.act(action)
            if i >= FRAME_SKIP - 2:
                screen = emu.ale.getScreenGrayscale()
                pooled = screen if pooled is None else np.maximum(pooled, screen)
        frames.append(pooled)
        if emu.ale.game_over():
            emu.ale.reset_game()
    emu.env.close()
    return np.median(np.stack(frames), axis=0).astype(np.uint8)


def crop_resize(screen: np.ndarray, dim: int, window: tuple[int, int]) -> np.ndarray:
    """What the agent sees: the window along `dim` (the whole other dimension), resized like both back-ends do."""
    cropped = np.take(screen, np.arange(*window), axis=dim)
    return cv2.resize(cropped, (84, 84), interpolation=cv2.INTER_AREA)


def largest_window(axis2: int, size: int) -> tuple[int, int]:
    """The widest [start, stop) inside the screen symmetric about the axis (axis2 = 2 * axis, an integer)."""
    start = max(0, axis2 + 1 - size)
    return start, axis2 + 1 - start


def mirror_error(frame: np.ndarray, flip_axis: int) -> float:
    return float(np.abs(frame.astype(np.float64) - np.flip(frame, flip_axis)).mean())


def background_axes(background: np.ndarray, dim: int, around: float, search: float = 4.0) -> list[dict]:
    """How symmetric the median background is (in the 84x84 frame, over the widest window) about axes within
    `search` raw pixels of the player's axis, most symmetric first: a cross-check of the player's axis. The HUD's
    asymmetry weighs on every candidate alike, so what decides is the playfield."""
    size = background.shape[dim]
    results = []
    for axis2 in range(int(2 * (around - search)), int(2 * (around + search)) + 1):
        window = largest_window(axis2, size)
        frame = crop_resize(background, dim, window)
        error = round(mirror_error(frame, dim), 3)
        results.append({"axis": axis2 / 2, "window": list(window), "mean_abs_diff_84": error})
    return sorted(results, key=lambda r: r["mean_abs_diff_84"])


def background_features(background: np.ndarray, dim: int) -> list[dict]:
    """The static things of the median background: runs of lines (across the mirrored dimension) holding pixels
    other than the commonest value, each with the first and last such pixel along the mirrored dimension and their
    centre; a feature centred on the axis (walls, shields, beams) supports it, a HUD's digits need not be."""
    values, counts = np.unique(background, return_counts=True)
    drawn = background != values[counts.argmax()]
    if dim == 0:
        drawn = drawn.T  # lines are columns: index [line, position along the mirror]
    lines = np.flatnonzero(drawn.any(axis=1))
    features = []
    for run in np.split(lines, np.flatnonzero(np.diff(lines) > 1) + 1):
        positions = np.flatnonzero(drawn[run].any(axis=0))
        features.append(
            {
                "lines": [int(run[0]), int(run[-1])],
                "extent": [int(positions[0]), int(positions[-1])],
                "centre": (int(positions[0]) + int(positions[-1])) / 2,
            }
        )
    return features


def asymmetric_bands(frame: np.ndarray, flip_axis: int, dim: int, screen_shape) -> list:
    """Where along the other dimension the mirror error comes from: runs of 84-px lines whose share of the mean
    absolute difference exceeds 0.02, with the raw-screen lines they show."""
    diff = np.abs(frame.astype(np.float64) - np.flip(frame, flip_axis))
    share = diff.sum(axis=flip_axis) / diff.size  # per line of the other dimension; sums to the mean
    other_size = screen_shape[1 - dim]  # the other dimension is never cropped
    bands, current = [], None
    for line, value in enumerate(share):
        if value > 0.02:
            if current is not None and current["lines_84"][1] == line - 1:
                current["lines_84"][1] = line
                current["share"] += value
            else:
                current = {"lines_84": [line, line], "share": value}
                bands.append(current)
    for band in bands:
        first, last = band["lines_84"]
        band["raw_lines"] = [int(first * other_size / 84), int(np.ceil((last + 1) * other_size / 84)) - 1]
        band["share"] = round(band["share"], 3)
    return bands


def range_error_84(player_range: list[int], window: tuple[int, int]) -> float:
    """How far (84-px) the mirror of the player's reachable range lands from the range itself: the mirror maps the
    84-px edge coordinate u to 84 - u, so the error is |u(low edge) + u(high edge) - 84|."""
    start, stop = window
    scale = 84 / (stop - start)
    low, high = (player_range[0] - start) * scale, (player_range[1] + 1 - start) * scale
    return abs(low + high - 84)


# --------------------------------------------------------------------------------------------------------------
# Speed of the crop
# --------------------------------------------------------------------------------------------------------------
def throughput(env_id: str, backend: str, crop: bool, num_envs: int, steps: int) -> float:
    envs = make_atari_envs(env_id, num_envs, backend, playfield_crop=crop)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, envs.single_action_space.n, size=(steps, num_envs))
    start = time.perf_counter()
    for t in range(steps):
        envs.step(actions[t])
    elapsed = time.perf_counter() - start
    envs.close()
    return num_envs * steps / elapsed


def measure_speed(args: Args) -> dict:
    env_id = f"{args.speed_game}NoFrameskip-v4"
    results = {}
    for backend in ("ale", "gym"):
        runs = {False: [], True: []}
        for _ in range(args.speed_repeats):
            for crop in (False, True):  # alternate, so both see the same machine load
                runs[crop].append(throughput(env_id, backend, crop, args.speed_envs, args.speed_steps))
        plain, cropped = float(np.median(runs[False])), float(np.median(runs[True]))
        results[backend] = {
            "env_steps_per_s_without_crop": [round(x) for x in runs[False]],
            "env_steps_per_s_with_crop": [round(x) for x in runs[True]],
            "median_without_crop": round(plain),
            "median_with_crop": round(cropped),
            "cost_percent": round(100 * (1 - cropped / plain), 1),
        }
    # the native back-end's crop replaces its own (threaded, C++) resize by this one, serial in Python
    screen = np.random.default_rng(0).integers(0, 256, (210, 160), dtype=np.uint8)
    symmetry = MIRROR_SYMMETRIES[args.speed_game]
    start, repeats = time.perf_counter(), 5000
    for _ in range(repeats):
        playfield_frame(screen, symmetry)
    per_frame = (time.perf_counter() - start) / repeats
    return {
        "env_id": env_id,
        "num_envs": args.speed_envs,
        "steps": args.speed_steps,
        "backends": results,
        "python_crop_and_resize_us_per_frame": round(per_frame * 1e6, 1),
    }


# --------------------------------------------------------------------------------------------------------------
def measure_game(game: str, args: Args) -> tuple[dict, dict]:
    symmetry = MIRROR_SYMMETRIES[game]
    player = measure_player_range(game, args.seed)
    dim = 1 if player["dimension"] == "columns" else 0
    flip_axis = dim  # in the 84x84 frame as in the raw screen: rows are axis 0, columns axis 1
    background = median_background(game, args.background_steps, args.seed)
    size = background.shape[dim]
    axis2 = player["range"][0] + player["range"][1]
    widest = largest_window(axis2, size)
    table_window = tuple(symmetry.window)
    frames = {
        "whole screen (today)": crop_resize(background, dim, (0, size)),
        "widest window about the player's axis": crop_resize(background, dim, widest),
        "table window": crop_resize(background, dim, table_window),
    }
    evaluations = {}
    for name, window in zip(frames, [(0, size), widest, table_window]):
        evaluations[name] = {
            "window": list(window),
            "background_mean_abs_diff_84": round(mirror_error(frames[name], flip_axis), 3),
            "player_range_error_84px": round(range_error_84(player["range"], window), 3),
            "asymmetric_bands": asymmetric_bands(frames[name], flip_axis, dim, background.shape),
        }
    result = {
        "mirror": symmetry.axis,
        "player": player,
        "measured_axis": player["axis"],
        "axis_offset_from_frame_centre_raw_px": player["axis"] - player["frame_centre"],
        "background_axis_candidates": background_axes(background, dim, player["axis"])[:5],
        "background_features": background_features(background, dim),
        "sweeps": {SWEEPS[game][0]: sweep_range(game, SWEEPS[game][1], args.seed)} if game in SWEEPS else {},
        "table": {
            "axis": symmetry.centre,
            "window": list(table_window),
            "approximate": symmetry.approximate,
            "offset_from_player_axis": symmetry.centre - player["axis"],
        },
        "evaluations": evaluations,
    }
    images = {"background": background, "frames": frames, "flip_axis": flip_axis}
    return result, images


def montage(images: dict[str, dict], path: str):
    """Per game (rows): the 84x84 background today, today's mirror, with the table's crop, its mirror, and the
    absolute difference of the last two (x4 brighter), each shown at 2x."""
    tiles_rows = []
    for game, item in images.items():
        today = item["frames"]["whole screen (today)"]
        cropped = item["frames"]["table window"]
        flip = item["flip_axis"]
        diff = np.clip(np.abs(cropped.astype(np.int16) - np.flip(cropped, flip)) * 4, 0, 255).astype(np.uint8)
        tiles = [today, np.flip(today, flip), cropped, np.flip(cropped, flip), diff]
        shown = [cv2.resize(t, (168, 168), interpolation=cv2.INTER_NEAREST) for t in tiles]
        row = np.concatenate([np.pad(t, 4, constant_values=255) for t in shown], 1)
        label = np.full((row.shape[0], 120), 255, np.uint8)
        cv2.putText(label, game, (4, 90), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1)
        tiles_rows.append(np.concatenate([label, row], 1))
    header = np.full((24, tiles_rows[0].shape[1]), 255, np.uint8)
    for i, text in enumerate(["today", "today mirrored", "crop", "crop mirrored", "|diff| x4"]):
        cv2.putText(header, text, (124 + i * 176, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1)
    cv2.imwrite(path, np.concatenate([header, *tiles_rows], 0))


def main(args: Args):
    games = [g for g in args.games.split(",") if g] or list(MIRROR_SYMMETRIES)
    unknown = [g for g in games if g not in MIRROR_SYMMETRIES]
    if unknown:
        fail(f"{', '.join(unknown)} not in MIRROR_SYMMETRIES ({', '.join(MIRROR_SYMMETRIES)}).")
    # committed results are kept: the default path may exist only with --overwrite (before measuring anything)
    out = results_path(args, "atari_mirror_axes.json", (".png",) if args.png else ())
    png = companion(out, ".png")

    results, images = {}, {}
    for game in games:
        start = time.perf_counter()
        results[game], images[game] = measure_game(game, args)
        r = results[game]
        ev = r["evaluations"]
        print(
            f"{game:14s} range {r['player']['range']} axis {r['measured_axis']:6.1f} "
            f"(centre {r['player']['frame_centre']}) table {r['table']['axis']} "
            f"bg MAD today {ev['whole screen (today)']['background_mean_abs_diff_84']:.2f} "
            f"crop {ev['table window']['background_mean_abs_diff_84']:.2f} "
            f"range err today {ev['whole screen (today)']['player_range_error_84px']:.2f} "
            f"crop {ev['table window']['player_range_error_84px']:.2f}  ({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    report = {
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tag", "overwrite")},
        "coordinates": (
            "raw-screen pixel indices (210x160; Carnival 214x160), along the mirrored dimension; the mirror about "
            "`axis` maps pixel i to 2 * axis - i; a window is [start, stop); 84-px errors are in the 84x84 frame"
        ),
        "games": results,
    }
    if "Breakout" in results:
        report["breakout_today_background_mean_abs_diff_84"] = results["Breakout"]["evaluations"][
            "whole screen (today)"
        ]["background_mean_abs_diff_84"]
    if args.speed_steps > 0:
        report["speed"] = measure_speed(args)
        print(json.dumps(report["speed"], indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    if args.png:
        montage(images, png)
    print(f"wrote {out}" + (f" and {png}" if args.png else ""))


if __name__ == "__main__":
    main(cli(Args, __doc__))
