"""Agent-side helpers of the manipulation scripts: vector envs, the observation tensor, rotation of batches (the
task's symmetry applied to training data), and evaluation of a policy.

Action layout, everywhere: a = (p, dx, dy, dz, dtheta) in [-1, 1]^5. Under a turn R of the world about the gripper
axis the image turns (torch.rot90 for R = +90 degrees) and (dx, dy) -> R (dx, dy); p, dz and dtheta are invariant.
A manipulation actor maps the float observation (B, 2, S, S) to (mean, log_std) of a tanh-squashed Gaussian; its
deterministic action is tanh(mean).
"""

from __future__ import annotations

from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cleanrl_equi
from cleanrl_equi.envs.manipulation.metrics import EPISODE_METRICS, action_smoothness
from cleanrl_equi.errors import fail
from cleanrl_equi.run import new_folder

__all__ = ["action_smoothness", "check_env_id", "evaluate", "evaluate_checkpoint", "format_eval", "make_envs",
           "obs_to_tensor", "rotate_batch"]


def check_env_id(env_id: str) -> None:
    """Stop with one sentence unless `env_id` is one of the manipulation tasks, `cleanrl_equi/<Task>-v0`."""
    task = env_id.removeprefix("cleanrl_equi/").removesuffix("-v0")
    if env_id not in gym.registry:
        tasks = ",".join(cleanrl_equi.MANIPULATION_TASKS)
        fail(f"unknown env id {env_id!r}; use one of cleanrl_equi/{{{tasks}}}-v0.")
    if not env_id.startswith("cleanrl_equi/") or task not in cleanrl_equi.MANIPULATION_TASKS:
        fail(f"{env_id!r} is not a manipulation task; use cleanrl_equi/<Task>-v0 (e.g. cleanrl_equi/BlockPulling-v0).")


def rotate_batch(batch: dict[str, torch.Tensor], angles: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn each sample's world by its angle (radians, counter-clockwise seen from above) about the gripper axis:
    the height channels of obs and next_obs rotate about the image centre (bilinear, the table's 0 fills the
    corners; pi/2 gives exactly torch.rot90(x, 1, dims=(-2, -1))), (dx, dy) rotates by the same angle and is clipped
    to [-1, 1]; p, dz, dtheta, the holding flag and the reward are unchanged."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid maps output coordinates (x = column, y = row, in [-1, 1]) to input coordinates; a +90 degree
    # rot90 takes output (row, col) from input (col, S-1-row), i.e. x_in = -y_out, y_in = x_out at angle pi/2
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    out = dict(batch)
    for key in ("obs", "next_obs"):
        obs = batch[key]
        grid = F.affine_grid(theta, list(obs[:, :1].shape), align_corners=False)
        heights = F.grid_sample(obs[:, :1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[key] = torch.cat([heights, obs[:, 1:]], dim=1)
    actions = batch["actions"].clone()
    dx, dy = actions[:, 1].clone(), actions[:, 2].clone()
    actions[:, 1], actions[:, 2] = cos * dx - sin * dy, sin * dx + cos * dy
    out["actions"] = actions.clamp(-1.0, 1.0)
    return out


# ---- Environments and evaluation ------------------------------------------------------------------------------------
def make_envs(args, num_envs: int, asynchronous: bool = False, video_folder: Optional[str] = None,
              physics_metrics: bool = True, video_episodes: Optional[list[int]] = None):
    """Vector envs of `args.env_id` with the env settings of `args` (a `ManipulationEnvArgs`: its `env_kwargs`).
    `physics_metrics=False` skips sampling the smoothness and gentleness metrics (envs whose info nobody reads, such
    as training envs; a force penalty samples them anyway). With `video_folder`, env i records its first
    `video_episodes[i]` episodes there (default: env 0 records all of its episodes)."""
    settings = args.env_kwargs(physics_metrics)
    if video_episodes is None:
        video_episodes = [1 << 62] + [0] * (num_envs - 1)

    def thunk(idx: int):
        def make():
            render_mode = "rgb_array" if video_folder and video_episodes[idx] > 0 else None
            env = gym.make(args.env_id, **settings, render_mode=render_mode)
            if render_mode:
                env = gym.wrappers.RecordVideo(env, video_folder, name_prefix=f"env{idx}",
                                               episode_trigger=lambda e: e < video_episodes[idx])
            return env

        return make

    vector_cls = gym.vector.AsyncVectorEnv if asynchronous and num_envs > 1 else gym.vector.SyncVectorEnv
    envs = vector_cls([thunk(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def obs_to_tensor(obs: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, 2, S, S) from the env -> float in [0, 1]: height / 255, holding flag 0/1."""
    return torch.as_tensor(obs, device=device).float().div_(255.0)


def tanh_of_mean(actor: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """The deterministic action of a tanh-squashed Gaussian actor whose forward returns (mean, log_std)."""
    return torch.tanh(actor(obs)[0])


def evaluate(actor: nn.Module, args, device: torch.device, seed: int, video_folder: Optional[str] = None,
             act: Callable[[nn.Module, torch.Tensor], torch.Tensor] = tanh_of_mean) -> dict[str, float]:
    """Run `args.eval_episodes` episodes with the deterministic action `act(actor, obs)` (default: tanh(mean)); return
    the mean success rate, discounted return (gamma^(T-1) for success at step T: the papers' metric, whatever
    reward shaping the envs add), length, and every smoothness and gentleness metric of the envs (metrics.py)."""
    num_envs = min(args.num_eval_envs, args.eval_episodes)
    quota = [args.eval_episodes // num_envs + (i < args.eval_episodes % num_envs) for i in range(num_envs)]
    envs = make_envs(args, num_envs, video_folder=video_folder, video_episodes=list(quota))  # one video an episode
    obs, _ = envs.reset(seed=seed)
    returns, successes, lengths = [], [], []
    episode_metrics: dict[str, list[float]] = {key: [] for key in EPISODE_METRICS}
    steps = np.zeros(num_envs, dtype=int)
    resetting = np.zeros(num_envs, dtype=bool)
    with torch.no_grad():
        actor.eval()  # nothing is updated during the evaluation: escnn layers expand their filters once
        while any(q > 0 for q in quota):
            actions = act(actor, obs_to_tensor(obs, device)).cpu().numpy()
            obs, rewards, terminations, truncations, infos = envs.step(actions)
            for i in range(num_envs):
                if resetting[i] or quota[i] == 0:  # this step reset env i (its action was ignored), or it is done
                    continue
                steps[i] += 1
                if terminations[i] or truncations[i]:
                    success = bool(infos["is_success"][i])
                    returns.append(args.gamma ** (steps[i] - 1) if success else 0.0)
                    successes.append(float(success))
                    lengths.append(steps[i])
                    for key, values in episode_metrics.items():
                        values.append(float(infos[key][i]))  # the last step's info holds the episode's values
                    quota[i] -= 1
                    steps[i] = 0
            resetting = np.logical_or(terminations, truncations)
    actor.train()
    envs.close()
    return {"success_rate": float(np.mean(successes)), "discounted_return": float(np.mean(returns)),
            "episode_length": float(np.mean(lengths)),
            **{key: float(np.mean(values)) for key, values in episode_metrics.items()}}


def format_eval(result: dict[str, float], episodes: int, seed: int,
                policy: str = "deterministic action tanh(mean)") -> str:
    """One evaluation line; it names the policy and the seed, so two evaluations of the same weights can be told
    apart (other seeds are other scenes)."""
    return (f"success {result['success_rate']:.3f} | discounted return {result['discounted_return']:.4f} | "
            f"length {result['episode_length']:.2f} | smoothness {result['action_smoothness']:.6f} | "
            f"action change {result['action_change']:.6f} | jerk {result['mean_squared_jerk']:.4g} m2/s6 | "
            f"peak grip force {result['peak_grip_force']:.1f} N | drops {result['drops']:.2f} over {episodes} episodes "
            f"({policy}, evaluation seed {seed})")


def evaluate_checkpoint(actor: nn.Module, saved, args, device: torch.device,
                        act: Callable[[nn.Module, torch.Tensor], torch.Tensor] = tanh_of_mean,
                        policy: str = "deterministic action tanh(mean)") -> None:
    """A script's `--eval-checkpoint`: report `args.eval_episodes` episodes of the saved `actor` (acting with
    `act`), trained with the settings `saved`, under the env settings it was trained with."""
    if args.eval_episodes < 1 or args.num_eval_envs < 1:
        fail("--eval-episodes and --num-eval-envs must be at least 1.")
    saved.eval_episodes, saved.num_eval_envs = args.eval_episodes, args.num_eval_envs
    video_folder = new_folder(f"videos/{saved.env_id.replace('/', '_')}__{saved.exp_name}__eval") \
        if args.capture_video else None
    result = evaluate(actor, saved, device, seed=saved.seed + 10_000, video_folder=video_folder, act=act)
    print(f"{saved.env_id} ({saved.model}): {format_eval(result, args.eval_episodes, saved.seed + 10_000, policy)}",
          flush=True)
    if video_folder:
        print(f"videos of the {args.eval_episodes} episodes in {video_folder}", flush=True)


