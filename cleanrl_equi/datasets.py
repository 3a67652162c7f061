"""Offline datasets of the manipulation tasks: one `.npz` file per dataset, its checks, and collection.

A dataset is a list of whole **episodes**, stored back to back. Episode e with T_e steps contributes
T_e + 1 observations (its first observation up to its true final observation; never the reset frame of the next
episode) and T_e transitions. Arrays in the file (N transitions, E episodes, N + E observations, S = image size):

    heights          uint8 (N+E, S, S)  channel 0 of the observation: height above the table in mm
    holding          bool  (N+E,)       channel 1 of the observation: the holding flag (the env tiles it as 0/255)
    actions          float32 (N, 5)     (p, dx, dy, dz, dtheta) in [-1, 1], as executed
    rewards          float32 (N,)
    terminations     bool  (N,)         success, or an object left the workspace
    truncations      bool  (N,)         time-out (`max_steps` reached): a truncation, never a termination
    expert           bool  (N,)         the transition came from the planner
    episode_lengths  int64 (E,)
    episode_seeds    int64 (E,)         the seed the episode's env was reset with (its scene)
    metadata         JSON string        format version, env id, image size, episode limit, every env setting
                                        (`env_settings`: the flags of `BulletArmEnvArgs`) and the env's kwargs
                                        (`env_kwargs`), quality, collecting policy, seed, counts, success rate,
                                        mean discounted return (gamma 0.99), each episode's smoothness and
                                        gentleness metrics with their means (`episode_metrics`, `metric_means`),
                                        creation date, and a sha256 checksum of the arrays

Transition t of the flat arrays leaves observation row `obs_index[t]`; its next observation is row
`obs_index[t] + 1`. Images stay uint8 (16 KiB per 128x128 observation before compression; the height maps are
mostly flat table, so they compress well).

Qualities (the Equivariant Offline RL paper's): "expert" = planner episodes; "medium" = greedy roll-outs (tanh of the
mean) of a saved SAC actor whose evaluation discounted return reaches `--reward-limit` (0.4 in the paper); "mixed" =
both, `--expert-fraction` of the episodes from the planner.

    uv run python -m cleanrl_equi.tools.make_dataset --env-id cleanrl_equi/BlockPulling-v0 --quality expert \\
        --num-episodes 10 --out datasets/block_pulling_expert.npz
    uv run python -m cleanrl_equi.tools.make_dataset --quality medium --checkpoint runs/<run>/sac_equi_bullet.cleanrl_model
    uv run python -m cleanrl_equi.tools.make_dataset --info datasets/block_pulling_expert.npz

Datasets are collected in BulletArm's env setting by default (`BulletArmEnvArgs`: 0.3 m workspace, pi/4 rotation
step, 50 steps); any other setting is recorded in `env_settings`. A file written before the settings were recorded
was collected with BulletArm's defaults (its image size and episode limit are in its metadata).

The training scripts read a dataset with `load_dataset(path, env_settings=args.env_settings())`, which refuses a
dataset collected in other env settings than the run's, and draw batches with `dataset.sample(batch_size, device)`;
without a path they use `default_dataset(args.env_settings(), ...)`, a small planner dataset built once and cached
under `$CLEANRL_EQUI_DATA` (default `~/.cache/cleanrl_equi/datasets/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from datetime import datetime, timezone
from typing import Callable, Optional, Union

import gymnasium as gym
import numpy as np
import torch

from cleanrl_equi.envs.manipulation import BulletArmEnvArgs, check_env_id
from cleanrl_equi.envs.manipulation.metrics import EPISODE_METRICS
from cleanrl_equi.errors import fail, flag, refuse_folder

FORMAT_VERSION = 1
GAMMA = 0.99  # the discount of the papers' metric (discounted return = gamma^(T-1) for success at step T)
QUALITIES = ("expert", "medium", "mixed")
ARRAYS = {  # name -> (dtype, number of dimensions)
    "heights": (np.uint8, 3),
    "holding": (np.bool_, 1),
    "actions": (np.float32, 2),
    "rewards": (np.float32, 1),
    "terminations": (np.bool_, 1),
    "truncations": (np.bool_, 1),
    "expert": (np.bool_, 1),
    "episode_lengths": (np.int64, 1),
    "episode_seeds": (np.int64, 1),
}
Policy = Union[str, Callable[[np.ndarray], np.ndarray]]


def stored_obs_to_tensor(heights: np.ndarray, holding: np.ndarray, device: torch.device) -> torch.Tensor:
    """The compact stored form of observations (height channel uint8 (B, S, S), holding flag bool (B,)) -> the float
    (B, 2, S, S) the networks take: height / 255 and the flag as 0/1, as from the env's uint8 (2, S, S) / 255.
    Offline datasets and the SAC replay buffer store observations this way (16 KiB per 128 px image)."""
    heights = torch.as_tensor(heights, device=device).float().div_(255.0)
    flag = torch.as_tensor(holding, device=device).float()
    return torch.stack([heights, flag[:, None, None].expand_as(heights)], dim=1)


# ---- The dataset ----------------------------------------------------------------------------------------------------
class OfflineDataset:
    """Episodes of one task, flattened into transitions for sampling (see the module docstring for the arrays)."""

    def __init__(self, heights, holding, actions, rewards, terminations, truncations, expert, episode_lengths,
                 episode_seeds=None, metadata: Optional[dict] = None):
        self.heights = np.asarray(heights, dtype=np.uint8)
        self.holding = np.asarray(holding, dtype=bool)
        self.actions = np.asarray(actions, dtype=np.float32)
        self.rewards = np.asarray(rewards, dtype=np.float32)
        self.terminations = np.asarray(terminations, dtype=bool)
        self.truncations = np.asarray(truncations, dtype=bool)
        self.expert = np.asarray(expert, dtype=bool)
        self.episode_lengths = np.asarray(episode_lengths, dtype=np.int64)
        if episode_seeds is None:
            episode_seeds = np.full(len(self.episode_lengths), -1)
        self.episode_seeds = np.asarray(episode_seeds, dtype=np.int64)
        self.metadata = dict(metadata or {})
        episode_of_transition = np.repeat(np.arange(len(self.episode_lengths)), self.episode_lengths)
        self.obs_index = np.arange(len(self.actions), dtype=np.int64) + episode_of_transition
        """row of s_t in `heights` / `holding` for transition t; s_{t+1} is the row after it"""

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_lengths)

    @property
    def image_size(self) -> int:
        return int(self.heights.shape[-1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def observations(self, rows) -> np.ndarray:
        """The env's observations at `rows` of `heights`: uint8 (n, 2, S, S), holding flag tiled as 0/255."""
        heights = self.heights[rows]
        flag = np.broadcast_to((self.holding[rows] * np.uint8(255))[:, None, None], heights.shape)
        return np.stack([heights, flag], axis=1)

    def episode(self, e: int) -> dict[str, np.ndarray]:
        """Episode e as Minari lays it out: T+1 observations (uint8 (T+1, 2, S, S)) and T of everything else."""
        start = int(self.episode_lengths[:e].sum())
        stop = start + int(self.episode_lengths[e])
        first_obs = start + e
        return {"observations": self.observations(np.arange(first_obs, first_obs + stop - start + 1)),
                "actions": self.actions[start:stop], "rewards": self.rewards[start:stop],
                "terminations": self.terminations[start:stop], "truncations": self.truncations[start:stop],
                "expert": self.expert[start:stop]}

    def sample(self, batch_size: int, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
        """A batch of transitions drawn uniformly with replacement (from NumPy's global generator, so a script's
        seeding and RNG checkpoint cover it). obs / next_obs are float (B, 2, S, S) in [0, 1]: height / 255 and the
        holding flag tiled as 0/1, i.e. the env's observation / 255."""
        index = np.random.randint(0, len(self), size=batch_size)
        rows = self.obs_index[index]
        return {"obs": stored_obs_to_tensor(self.heights[rows], self.holding[rows], device),
                "next_obs": stored_obs_to_tensor(self.heights[rows + 1], self.holding[rows + 1], device),
                "actions": torch.as_tensor(self.actions[index], device=device),
                "rewards": torch.as_tensor(self.rewards[index], device=device),
                "terminated": torch.as_tensor(self.terminations[index], device=device).float(),
                "expert": torch.as_tensor(self.expert[index], device=device)}

    def episode_returns(self, gamma: float = GAMMA) -> np.ndarray:
        """Discounted return of every episode, sum_t gamma^t r_t."""
        ends = np.cumsum(self.episode_lengths)
        step_in_episode = np.arange(len(self)) - np.repeat(ends - self.episode_lengths, self.episode_lengths)
        discounted = self.rewards.astype(np.float64) * gamma ** step_in_episode
        return np.add.reduceat(discounted, ends - self.episode_lengths) if len(self) else np.zeros(0)

    def episode_successes(self) -> np.ndarray:
        """Whether each episode ended in success (a task's reward is 1 only on the step it succeeds)."""
        ends = np.cumsum(self.episode_lengths) - 1
        return self.terminations[ends] & (self.rewards[ends] > 0)


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes (in name order): detects any change of content."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def summarise(dataset: OfflineDataset) -> dict:
    """The metadata fields that follow from the arrays (counts, success rate, discounted return, checksum)."""
    returns = dataset.episode_returns(GAMMA)
    return {"num_episodes": dataset.num_episodes, "num_transitions": len(dataset),
            "num_expert_transitions": int(dataset.expert.sum()),
            "success_rate": float(dataset.episode_successes().mean()), "gamma": GAMMA,
            "discounted_return": float(returns.mean()),
            "mean_episode_length": float(dataset.episode_lengths.mean()),
            "checksum": checksum(dataset.arrays())}


# ---- Files ----------------------------------------------------------------------------------------------------------
def task_label(env_id: str) -> str:
    """cleanrl_equi/BlockPulling-v0 -> block_pulling."""
    task = env_id.split("/")[-1].split("-v")[0]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", task).lower()


def collection_settings(env_id: str, image_size: int, max_steps: int,
                        env_settings: Optional[dict] = None) -> BulletArmEnvArgs:
    """The env settings of a collection: `env_settings` (a `ManipulationEnvArgs.env_settings()` dict; None: BulletArm's
    defaults) for the task `env_id` at `image_size` px with `max_steps`-step episodes."""
    settings = BulletArmEnvArgs(**{**(env_settings or {}), "env_id": env_id, "image_size": image_size,
                                   "max_steps": max_steps})
    for name, value in (env_settings or {}).items():
        if getattr(settings, name) != value:
            raise ValueError(f"env_settings has {name}={value!r}, but {getattr(settings, name)!r} was passed")
    return settings


def recorded_env_settings(metadata: dict) -> dict:
    """The env settings a dataset was collected with: its `env_settings`; a file written before they were recorded
    was collected with BulletArm's defaults, at the image size and episode limit in its metadata."""
    settings = BulletArmEnvArgs(env_id=metadata.get("env_id"), image_size=metadata.get("image_size"),
                                max_steps=metadata.get("max_steps", BulletArmEnvArgs.max_steps)).env_settings()
    recorded = metadata.get("env_settings")
    if isinstance(recorded, dict):
        settings.update({name: value for name, value in recorded.items() if name in settings})
    return settings


def changed_settings(env_settings: dict, skip: tuple[str, ...] = ("env_id", "image_size", "max_steps")) -> list[str]:
    """The settings (other than `skip`) that differ from BulletArm's defaults, the datasets' own."""
    defaults = BulletArmEnvArgs().env_settings()
    return [name for name, value in env_settings.items() if name not in skip and value != defaults.get(name)]


def env_flags(env_settings: dict, names) -> str:
    """The command-line flags that set `names` to their values in `env_settings` (`--workspace-size 0.4
    --no-paper-tasks`)."""
    words = []
    for name in names:
        value = env_settings[name]
        if isinstance(value, bool):
            words.append(flag(name) if value else f"--no-{name.replace('_', '-')}")
        else:
            words.append(f"{flag(name)} {value}")
    return " ".join(words)


def dataset_filename(env_id: str, quality: str, num_episodes: int, image_size: int, max_steps: int, seed: int,
                     env_settings: Optional[dict] = None) -> str:
    """`block_pulling_expert_10ep_128px_50steps_seed0.npz`; settings other than BulletArm's add a short hash of
    them (`..._seed0_env1a2b3c4d.npz`), so datasets of two settings never share a name."""
    changed = changed_settings(env_settings or {})
    suffix = ""
    if changed:
        text = json.dumps({name: env_settings[name] for name in changed}, sort_keys=True)
        suffix = "_env" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return (f"{task_label(env_id)}_{quality}_{num_episodes}ep_{image_size}px_{max_steps}steps_seed{seed}"
            f"{suffix}.npz")


def collect_command(env_id: Optional[str], out: str, image_size: Optional[int] = None,
                    env_settings: Optional[dict] = None) -> str:
    """The CLI line that makes an expert dataset at `out` (quoted in error messages), in the env settings
    `env_settings` where given (the flags of those that differ from BulletArm's defaults). A path that is no `.npz`
    (a model or resume file passed as a dataset) is never the target: following the hint would replace it. An
    existing `.npz` (corrupt, or of an old format) is replaced only with `--overwrite`, which the line then says."""
    if not out.endswith(".npz"):
        out = "datasets/<name>.npz"
    replace = " --overwrite" if os.path.isfile(out) else ""
    size = f" --image-size {image_size}" if image_size else ""
    changed = changed_settings(env_settings or {}, skip=("env_id", "image_size"))
    settings = f" {env_flags(env_settings, changed)}" if changed else ""
    return (f"`uv run python -m cleanrl_equi.tools.make_dataset --env-id {env_id or 'cleanrl_equi/<Task>-v0'} "
            f"--quality expert{size}{settings} --out {out}{replace}`")


def save_dataset(path: str, dataset: OfflineDataset) -> None:
    """Write `dataset` to `path` (np.savez_compressed), atomically: a temporary file next to it is renamed into
    place, so a crash or a second process writing the same file never leaves a half-written dataset. The
    checksum and format version are (re)computed into `dataset.metadata`."""
    arrays = dataset.arrays()
    dataset.metadata.update(format_version=FORMAT_VERSION, checksum=checksum(arrays))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:  # a file object: numpy appends no ".npz" to the temporary name
            np.savez_compressed(file, metadata=np.array(json.dumps(dataset.metadata)), **arrays)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _check_consistent(path: str, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """Fail with one sentence unless the arrays fit together as whole episodes and match their checksum."""
    def corrupt(what: str):
        fail(f"dataset {path!r} is inconsistent ({what}); it is corrupt or not a cleanrl-equi dataset, so collect it "
             f"again with {collect_command(metadata.get('env_id'), path)}.")

    for name, (dtype, ndim) in ARRAYS.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != ndim:
            corrupt(f"array {name!r} is {arrays[name].dtype} with {arrays[name].ndim} dimensions, "
                    f"not {np.dtype(dtype)} with {ndim}")
    lengths = arrays["episode_lengths"]
    num_episodes, num_transitions = len(lengths), int(lengths.sum())
    if num_episodes == 0 or (lengths < 1).any():
        corrupt("it needs at least one episode and every episode at least one step")
    if arrays["actions"].shape != (num_transitions, 5):
        corrupt(f"actions have shape {arrays['actions'].shape}, not ({num_transitions}, 5) from the episode lengths")
    for name in ("rewards", "terminations", "truncations", "expert"):
        if len(arrays[name]) != num_transitions:
            corrupt(f"{len(arrays[name])} {name} for {num_transitions} transitions")
    heights = arrays["heights"]
    if heights.shape[0] != num_transitions + num_episodes or heights.shape[1] != heights.shape[2]:
        corrupt(f"heights have shape {heights.shape}, not ({num_transitions + num_episodes}, S, S) for "
                f"{num_episodes} episodes of {num_transitions} transitions")
    if len(arrays["holding"]) != len(heights) or len(arrays["episode_seeds"]) != num_episodes:
        corrupt("holding flags or episode seeds do not match the number of observations or episodes")
    last_step = np.zeros(num_transitions, dtype=bool)
    last_step[np.cumsum(lengths) - 1] = True
    ends = arrays["terminations"] | arrays["truncations"]
    if (ends != last_step).any() or (arrays["terminations"] & arrays["truncations"]).any():
        corrupt("episode ends (terminations, truncations) do not match the episode lengths")
    if metadata.get("num_episodes") != num_episodes or metadata.get("num_transitions") != num_transitions:
        corrupt("the metadata counts other episodes or transitions than the arrays hold")
    if metadata.get("image_size") != heights.shape[-1]:
        corrupt(f"the metadata says {metadata.get('image_size')} px but the images are {heights.shape[-1]} px")
    recorded = metadata.get("env_settings", {})
    if not isinstance(recorded, dict) or any(recorded.get(key, metadata.get(key)) != metadata.get(key)
                                             for key in ("env_id", "image_size", "max_steps")):
        corrupt("its recorded env settings disagree with its env id, image size or episode limit")
    if checksum(arrays) != metadata.get("checksum"):
        corrupt("its checksum does not match its content")


def load_dataset(path: str, env_id: Optional[str] = None, image_size: Optional[int] = None,
                 env_settings: Optional[dict] = None) -> OfflineDataset:
    """Read a dataset written by `save_dataset`, check it, and return it. Fails with one sentence (exit status 2)
    when the file is missing, unreadable or corrupt, or holds another task than `env_id` or another image size than
    `image_size` (None: accept any), or was collected in other env settings than `env_settings` (a
    `ManipulationEnvArgs.env_settings()` dict, which also gives env_id and image_size; None: accept any)."""
    if env_settings is not None:
        env_id, image_size = env_id or env_settings["env_id"], image_size or env_settings["image_size"]
    refuse_folder(path, "dataset", ".npz")
    if not os.path.isfile(path):
        fail(f"dataset {path!r} does not exist; make one with "
             f"{collect_command(env_id, path, image_size, env_settings)}.")
    try:
        with np.load(path, allow_pickle=False) as file:
            missing = [name for name in (*ARRAYS, "metadata") if name not in file.files]
            if missing:
                fail(f"dataset {path!r} lacks the arrays {', '.join(missing)}; it is not a cleanrl-equi dataset (or "
                     f"is corrupt), so collect it again with "
                     f"{collect_command(env_id, path, image_size, env_settings)}.")
            arrays = {name: file[name] for name in ARRAYS}
            metadata = json.loads(str(file["metadata"]))
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not a JSON object")
    except SystemExit:
        raise
    except Exception as exc:  # a truncated or garbled file fails in zipfile, zlib, numpy or json: all mean corrupt
        fail(f"dataset {path!r} could not be read ({type(exc).__name__}: {str(exc)[:100]}); it is corrupt or not a "
             f"cleanrl-equi dataset, so collect it again with "
             f"{collect_command(env_id, path, image_size, env_settings)}.")
    if metadata.get("format_version") != FORMAT_VERSION:
        fail(f"dataset {path!r} has format version {metadata.get('format_version')!r}, but this code reads version "
             f"{FORMAT_VERSION}; collect it again with {collect_command(metadata.get('env_id'), path)}.")
    _check_consistent(path, arrays, metadata)
    if env_id is not None and metadata.get("env_id") != env_id:
        fail(f"dataset {path!r} holds {metadata.get('env_id')} episodes, not {env_id}; pass a dataset of {env_id} "
             f"or collect one with {collect_command(env_id, 'datasets/<name>.npz', image_size, env_settings)}.")
    if image_size is not None and metadata["image_size"] != image_size:
        fail(f"dataset {path!r} has {metadata['image_size']}x{metadata['image_size']} images, not the "
             f"{image_size}x{image_size} asked for; pass --image-size {metadata['image_size']} or collect a "
             f"{image_size}-px dataset with "
             f"{collect_command(env_id, 'datasets/<name>.npz', image_size, env_settings)}.")
    if env_settings is not None:
        recorded = recorded_env_settings(metadata)
        differing = [name for name, value in env_settings.items() if name in recorded and recorded[name] != value]
        if differing:
            fail(f"dataset {path!r} was collected with {env_flags(recorded, differing)}, not "
                 f"{env_flags(env_settings, differing)} as set here; pass {env_flags(recorded, differing)} to use "
                 f"it, or collect a dataset in these settings with "
                 f"{collect_command(env_id, 'datasets/<name>.npz', image_size, env_settings)}.")
    return OfflineDataset(**arrays, metadata=metadata)


# ---- Collection -----------------------------------------------------------------------------------------------------
def make_env(settings: BulletArmEnvArgs) -> gym.Env:
    """One manipulation env in the env settings `settings` (their `env_kwargs`, with the physics metrics measured),
    failing with one sentence on an unknown task or an impossible setting."""
    check_env_id(settings.env_id)
    try:
        return gym.make(settings.env_id, **settings.env_kwargs())
    except (ValueError, TypeError) as exc:
        names = ["image_size", "max_steps", *changed_settings(settings.env_settings())]
        fail(f"cannot make {settings.env_id} with {env_flags(settings.env_settings(), names)}: {exc}")


def collect_episodes(env_id: str, num_episodes: int, seed: int, image_size: int, max_steps: int, policy: Policy,
                     *, quality: Optional[str] = None, policy_info: Optional[dict] = None,
                     env_settings: Optional[dict] = None, num_envs: Optional[int] = None,
                     progress_interval: Optional[float] = None) -> OfflineDataset:
    """Run `num_episodes` whole episodes; episode i starts from `reset(seed=seed + i)`.

    The envs take the env settings `env_settings` (a `ManipulationEnvArgs.env_settings()` dict, whose env_id,
    image_size and max_steps must be the ones passed; None: BulletArm's defaults), and the metadata records them.

    `policy` is "planner" (the env's `expert_action()`, transitions flagged expert) or a callable mapping a uint8
    observation batch (B, 2, S, S) to actions (B, 5); a callable is fed `num_envs` envs at once (default 8). Each
    episode depends only on its seed and the policy (not on which env ran it). `policy_info` describes a callable
    policy in the metadata. A progress line is printed every `progress_interval` seconds (None: never).
    """
    if num_episodes < 1:
        fail(f"the number of episodes must be at least 1, not {num_episodes}.")
    planner = isinstance(policy, str)
    if planner and policy != "planner":
        fail(f"policy must be 'planner' or a callable, not {policy!r}.")
    num_envs = min(num_episodes, num_envs or (1 if planner else 8))
    settings = collection_settings(env_id, image_size, max_steps, env_settings)
    envs = [make_env(settings) for _ in range(num_envs)]
    episodes: list[Optional[dict]] = [None] * num_episodes
    slots: list[Optional[dict]] = [None] * num_envs  # the episode each env is running
    next_episode, done, start, last_report = 0, 0, time.time(), time.time()
    while done < num_episodes:
        for j in range(num_envs):
            if slots[j] is None and next_episode < num_episodes:
                obs, _ = envs[j].reset(seed=seed + next_episode)
                slots[j] = {"index": next_episode, "last_obs": obs, "heights": [obs[0].copy()],
                            "holding": [obs[1, 0, 0] > 0], "actions": [], "rewards": [], "terminations": [],
                            "truncations": []}
                next_episode += 1
        active = [j for j in range(num_envs) if slots[j] is not None]
        if planner:
            actions = np.stack([envs[j].unwrapped.expert_action() for j in active])
        else:
            actions = np.asarray(policy(np.stack([slots[j]["last_obs"] for j in active])), dtype=np.float64)
            if actions.shape != (len(active), 5):
                raise ValueError(f"the policy returned actions of shape {actions.shape}, not ({len(active)}, 5)")
        actions = np.clip(actions, -1.0, 1.0).astype(np.float32)
        for j, action in zip(active, actions):
            obs, reward, terminated, truncated, info = envs[j].step(action)
            slot = slots[j]
            slot["last_obs"] = obs
            slot["heights"].append(obs[0].copy())  # the height channel and one flag; the tiled one is dropped
            slot["holding"].append(obs[1, 0, 0] > 0)
            slot["actions"].append(action)
            slot["rewards"].append(reward)
            slot["terminations"].append(terminated)
            slot["truncations"].append(truncated)
            if terminated or truncated:
                slot["metrics"] = {key: float(info[key]) for key in EPISODE_METRICS if key in info}
                episodes[slot["index"]] = slot
                slots[j] = None
                done += 1
        if progress_interval is not None and time.time() - last_report >= progress_interval and done < num_episodes:
            last_report = time.time()
            rate = done / (last_report - start)
            left = f", ~{(num_episodes - done) / rate:.0f} s left" if rate > 0 else ""
            transitions = sum(len(e["actions"]) for e in episodes if e is not None)
            print(f"{env_id}: {done}/{num_episodes} episodes, {transitions} transitions, {rate:.2f} episodes/s"
                  f"{left}", flush=True)
    for env in envs:
        env.close()

    dataset = OfflineDataset(
        heights=np.stack([h for e in episodes for h in e["heights"]]),
        holding=np.array([h for e in episodes for h in e["holding"]], dtype=bool),
        actions=np.concatenate([e["actions"] for e in episodes]).reshape(-1, 5),
        rewards=np.concatenate([e["rewards"] for e in episodes]),
        terminations=np.concatenate([e["terminations"] for e in episodes]),
        truncations=np.concatenate([e["truncations"] for e in episodes]),
        expert=np.full(sum(len(e["actions"]) for e in episodes), planner),
        episode_lengths=[len(e["actions"]) for e in episodes], episode_seeds=seed + np.arange(num_episodes))
    dataset.metadata = _metadata(settings, quality or ("expert" if planner else "medium"),
                                 policy_info or ({"type": "planner"} if planner else {"type": "callable"}),
                                 seed, dataset, {key: [e["metrics"][key] for e in episodes]
                                                 for key in episodes[0]["metrics"]})
    return dataset


def _metadata(settings: BulletArmEnvArgs, quality, policy_info, seed, dataset,
              episode_metrics: Optional[dict] = None) -> dict:
    """`episode_metrics`: {metric: one value per episode, in episode order} (the smoothness and gentleness metrics
    of cleanrl_equi/envs/manipulation/metrics.py, from each episode's last info); their means go beside them.
    `env_settings` are the flags the data was collected with, `env_kwargs` what `gym.make` took (as JSON keeps
    them: tuples become lists), which a Minari export records to rebuild the env."""
    metrics = {}
    if episode_metrics:
        metrics = {"episode_metrics": episode_metrics,
                   "metric_means": {key: float(np.mean(values)) for key, values in episode_metrics.items()}}
    return {"format_version": FORMAT_VERSION, "env_id": settings.env_id, "image_size": settings.image_size,
            "max_steps": settings.max_steps, "env_settings": settings.env_settings(),
            "env_kwargs": json.loads(json.dumps(settings.env_kwargs())),
            "quality": quality, "policy": policy_info, "seed": seed, **summarise(dataset), **metrics,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": "cleanrl_equi.datasets"}


def concatenate(datasets: list[OfflineDataset], quality: str, policy_info: dict, seed: int) -> OfflineDataset:
    """The episodes of several datasets of the same task and settings, in order, as one dataset."""
    first = datasets[0].metadata
    dataset = OfflineDataset(
        heights=np.concatenate([d.heights for d in datasets]), holding=np.concatenate([d.holding for d in datasets]),
        **{name: np.concatenate([getattr(d, name) for d in datasets])
           for name in ("actions", "rewards", "terminations", "truncations", "expert", "episode_lengths",
                        "episode_seeds")})
    metrics = None
    if all("episode_metrics" in d.metadata for d in datasets):  # kept only if every part has them
        keys = set.intersection(*(set(d.metadata["episode_metrics"]) for d in datasets))
        metrics = {key: [v for d in datasets for v in d.metadata["episode_metrics"][key]] for key in sorted(keys)}
    dataset.metadata = _metadata(BulletArmEnvArgs(**recorded_env_settings(first)), quality, policy_info, seed,
                                 dataset, metrics)
    return dataset


def collect_expert(env_id: str, num_episodes: int, seed: int, image_size: int = 128, max_steps: int = 50,
                   **kwargs) -> OfflineDataset:
    """`num_episodes` planner episodes ("expert" quality)."""
    return collect_episodes(env_id, num_episodes, seed, image_size, max_steps, "planner", quality="expert", **kwargs)


def data_dir() -> str:
    """Where default datasets are cached: `$CLEANRL_EQUI_DATA`, else `~/.cache/cleanrl_equi/datasets`."""
    return os.environ.get("CLEANRL_EQUI_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "cleanrl_equi",
                                                               "datasets")


def default_dataset(env_settings: dict, num_episodes: int = 10, seed: int = 0) -> str:
    """The path of the embedded default dataset in the env settings `env_settings` (a
    `ManipulationEnvArgs.env_settings()` dict): `num_episodes` planner episodes, built (one printed line) the first
    time and cached under `data_dir()`. Two processes building it at once each write a temporary file and rename
    it into place; both produce the same episodes, and neither ever sees a half-written file."""
    env_id, image_size, max_steps = env_settings["env_id"], env_settings["image_size"], env_settings["max_steps"]
    path = os.path.join(data_dir(), dataset_filename(env_id, "expert", num_episodes, image_size, max_steps, seed,
                                                     env_settings))
    if not os.path.isfile(path):
        changed = changed_settings(env_settings)
        other = f", {env_flags(env_settings, changed)}" if changed else ""
        print(f"building the default dataset ({num_episodes} planner episodes of {env_id}, {image_size} px, "
              f"max {max_steps} steps{other}, seed {seed}) at {path}", flush=True)
        save_dataset(path, collect_expert(env_id, num_episodes, seed, image_size, max_steps,
                                          env_settings=env_settings))
    return path


# ---- Minari export --------------------------------------------------------------------------------------------------
def import_minari():
    try:
        import minari
    except ImportError:
        fail("the Minari export needs the `minari` extra: `uv sync --extra minari` (or `pip install "
             "'minari[hdf5]==0.5.3'`, the last release that keeps NumPy 1.x).")
    return minari


def to_minari(dataset: OfflineDataset, dataset_id: str, author: Optional[str] = "cleanrl-equi",
              description: Optional[str] = None):
    """Write `dataset` as a local Minari dataset `dataset_id` (under `$MINARI_DATASETS_PATH`, default
    `~/.minari/datasets`) and return it. Observations are the env's: Box(0, 255, (2, S, S), uint8); actions
    Box(-1, 1, (5,), float32). Minari is an optional extra (`uv sync --extra minari`; in the dev group too):
    0.5.4+ needs NumPy 2, 0.5.3 works with our pins. It is imported here only."""
    minari = import_minari()
    from minari.data_collector import EpisodeBuffer

    size, meta = dataset.image_size, dataset.metadata
    spec = gym.spec(meta["env_id"])
    env_spec = gym.envs.registration.EnvSpec(id=spec.id, entry_point=spec.entry_point, kwargs=dict(meta["env_kwargs"]))
    buffer = []
    for e in range(dataset.num_episodes):
        episode = dataset.episode(e)
        expert = episode.pop("expert")  # Minari's infos have T+1 entries, like observations: the reset's comes first
        buffer.append(EpisodeBuffer(id=e, seed=int(dataset.episode_seeds[e]), **episode,
                                    infos={"expert": np.concatenate([expert[:1], expert])}))
    with warnings.catch_warnings():  # Minari's advice to name an author e-mail and an evaluation env
        warnings.filterwarnings("ignore", message=".*is set to None", category=UserWarning)
        try:
            return minari.create_dataset_from_buffers(
                dataset_id=dataset_id, buffer=buffer, env=env_spec,
                observation_space=gym.spaces.Box(0, 255, (2, size, size), np.uint8),
                action_space=gym.spaces.Box(-1.0, 1.0, (5,), np.float32),
                algorithm_name=f"cleanrl-equi {meta['quality']} data: {json.dumps(meta['policy'])}",
                author=author, code_permalink="cleanrl_equi/datasets.py",
                description=description or (
                    f"{meta['quality']} episodes of {meta['env_id']} converted from a cleanrl-equi dataset (sha256 "
                    f"{meta['checksum'][:16]}...); infos['expert'][t + 1] flags transition t as a planner step."))
        except ValueError as exc:  # an existing id, or one that breaks Minari's naming rules
            fail(f"Minari refused the dataset id {dataset_id!r} ({str(exc).strip()[:160]}); pick another id or "
                 f"remove the old one with `minari delete {dataset_id}`.")
