"""Networks, rotation augmentation and evaluation shared by the manipulation scripts (SAC, CQL, IQL).

Every function takes the calling script's `Args` and reads only the fields it needs, which all three scripts name
alike: `model`, `group_order`, `n_hidden`, `image_size` (networks), `env_id`, `max_steps`, `gamma`,
`eval_episodes`, `num_eval_envs` (evaluation).

Action layout, everywhere: a = (p, dx, dy, dz, dtheta) in [-1, 1]^5. Under a turn R of the world about the gripper
axis the image turns (torch.rot90 for R = +90 degrees) and (dx, dy) -> R (dx, dy); p, dz and dtheta are invariant.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cleanrl_equi
from cleanrl_equi.equivariant import TensorToField, enn, gspaces, planar_action_type
from cleanrl_equi.utils import fail, load_checkpoint, load_state

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def check_env_id(env_id: str) -> None:
    """Stop with one sentence unless `env_id` is one of the manipulation tasks, `cleanrl_equi/<Task>-v0`."""
    task = env_id.removeprefix("cleanrl_equi/").removesuffix("-v0")
    if env_id not in gym.registry:
        tasks = ",".join(cleanrl_equi.MANIPULATION_TASKS)
        fail(f"unknown env id {env_id!r}; use one of cleanrl_equi/{{{tasks}}}-v0.")
    if not env_id.startswith("cleanrl_equi/") or task not in cleanrl_equi.MANIPULATION_TASKS:
        fail(f"{env_id!r} is not a manipulation task; use cleanrl_equi/<Task>-v0 (e.g. cleanrl_equi/BlockPulling-v0).")


def check_network_args(args) -> None:
    """Stop at start-up, with one sentence, on an env id or network setting that cannot work."""
    check_env_id(args.env_id)
    if args.model not in ("equi", "cnn"):
        fail(f"--model must be 'equi' or 'cnn', not {args.model!r}.")
    if args.image_size not in (16, 32, 64, 128, 256):
        fail(f"--image-size {args.image_size} does not halve down to 8 pixels; use 16, 32, 64, 128 or 256.")
    if args.group_order < 2 or (args.group_order != 2 and args.group_order % 4 != 0):
        fail(f"--group-order {args.group_order} does not contain the 90-degree turns of the pixel grid; "
             "use 4, 8, 12, 16 (or 2).")
    if args.n_hidden < 8 or args.n_hidden % 8 != 0:
        fail(f"--n-hidden {args.n_hidden} must be a multiple of 8 (the first layer has n/8 fields).")


def layer_plan(n_hidden: int, image_size: int) -> list[tuple[int, int, bool]]:
    """The encoder's 3x3 conv layers as (width, padding, max-pool after) for an image_size x image_size input.

    The paper's 128-pixel schedule is 128 -> 64 -> 32 -> 16 -> 8 (padded convs, each followed by a 2x2 max-pool, of
    widths n/8, n/4, n/2, n), then a padded conv of width 2n at 8x8, an unpadded conv of width n (8 -> 6) and a
    pool (-> 3), and an unpadded conv of width n (3 -> 1). A smaller image drops the first (narrowest) halving
    layers; every stage keeps the grid symmetric, so 90-degree turns stay exact.
    """
    halvings = int(round(math.log2(image_size // 8)))
    widths = [max(1, n_hidden >> shift) for shift in range(halvings - 1, -1, -1)]  # ..., n/4, n/2, n
    return [(w, 1, True) for w in widths] + [(2 * n_hidden, 1, False), (n_hidden, 0, True), (n_hidden, 0, False)]


# ---- Networks -----------------------------------------------------------------------------------------------------
# escnn and train/eval mode. In train mode an escnn layer rebuilds its dense filter from the learnable basis
# coefficients at every forward pass, so gradients reach the coefficients and nothing can go stale. In eval mode it
# builds the filter once, when the module enters eval mode, and reuses it: fast, but stale after any weight update,
# and (if built under autograd) a backward through it works once only. So the scripts keep every network in
# train mode (acting during training also runs in train mode, under no_grad: one filter build per step, as an
# eval-mode refresh after each update would cost) and uses eval mode only inside `evaluate`, entered under
# no_grad after the last update and left before the next. Checkpoints are saved in train mode, where state_dicts
# hold only parameters (eval mode adds the cached filters as buffers, with other keys).


class EscnnModule(nn.Module):
    """Base for the escnn networks: mode switches happen outside autograd, and modules start in train mode."""

    def train(self, mode: bool = True):
        with torch.no_grad():  # leaving train mode expands and caches the filters: keep that cache graph-free
            return super().train(mode)


class EquiEncoder(EscnnModule):
    """2 x S x S image (height, holding flag: both trivial fields) -> n regular fields of C_N at 1 x 1."""

    def __init__(self, gspace, n_hidden: int, image_size: int):
        super().__init__()
        self.in_type = enn.FieldType(gspace, 2 * [gspace.trivial_repr])
        layers, field_type = [], self.in_type
        for width, padding, pool in layer_plan(n_hidden, image_size):
            out_type = enn.FieldType(gspace, width * [gspace.regular_repr])
            layers += [enn.R2Conv(field_type, out_type, 3, padding=padding), enn.ReLU(out_type, inplace=True)]
            if pool:
                layers.append(enn.PointwiseMaxPool2D(out_type, 2))
            field_type = out_type
        self.out_type = field_type
        self.input = TensorToField(self.in_type)
        self.net = enn.SequentialModule(*layers)

    def forward(self, x: torch.Tensor) -> enn.GeometricTensor:
        return self.net(self.input(x))


class EquiActor(EscnnModule):
    """Equivariant Gaussian policy: a 1x1 conv from the encoder to [(dx, dy) mean as one vector field] + [means of
    p, dz, dtheta and the five log-stds as eight invariant fields]."""

    def __init__(self, args):
        super().__init__()
        gspace = gspaces.rot2dOnR2(args.group_order)
        self.encoder = EquiEncoder(gspace, args.n_hidden, args.image_size)
        self.head = enn.R2Conv(self.encoder.out_type, planar_action_type(gspace, 8), 1)
        self.train()  # escnn layers are born holding empty filter buffers: drop them (see the note above)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.encoder(x)).tensor.flatten(1)  # (dx, dy, p, dz, dtheta, log-std x 5)
        mean = torch.cat([out[:, 2:3], out[:, 0:2], out[:, 3:5]], dim=1)  # -> (p, dx, dy, dz, dtheta)
        return mean, out[:, 5:10].clamp(LOG_STD_MIN, LOG_STD_MAX)


class EquiCritic(EscnnModule):
    """Twin invariant Q: one encoder; the action joins at the 1x1 bottleneck ((dx, dy) as a vector field, p, dz,
    dtheta as invariant fields); each head is a 1x1 conv to n regular fields, ReLU, a max over the group (an
    invariant feature per field), and a 1x1 conv to one invariant Q value."""

    def __init__(self, args):
        super().__init__()
        gspace = gspaces.rot2dOnR2(args.group_order)
        self.encoder = EquiEncoder(gspace, args.n_hidden, args.image_size)
        self.action_type = planar_action_type(gspace, 3)  # (dx, dy), p, dz, dtheta
        joint_type = self.encoder.out_type + self.action_type
        hidden_type = enn.FieldType(gspace, args.n_hidden * [gspace.regular_repr])
        pooled_type = enn.FieldType(gspace, args.n_hidden * [gspace.trivial_repr])
        q_type = enn.FieldType(gspace, [gspace.trivial_repr])
        self.q1, self.q2 = [
            enn.SequentialModule(enn.R2Conv(joint_type, hidden_type, 1), enn.ReLU(hidden_type, inplace=True),
                                 enn.GroupPooling(hidden_type), enn.R2Conv(pooled_type, q_type, 1))
            for _ in range(2)
        ]
        self.joint_type = joint_type
        self.train()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).tensor

    def q_values(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fields = action[:, [1, 2, 0, 3, 4]].reshape(-1, 5, 1, 1)  # (dx, dy) first, as the field type lists them
        joint = enn.GeometricTensor(torch.cat([features, fields], dim=1), self.joint_type)
        return self.q1(joint).tensor.flatten(), self.q2(joint).tensor.flatten()

    def forward(self, x, action):
        return self.q_values(self.encode(x), action)


def cnn_width_scale(group_order: int) -> float:
    return math.sqrt(2 * group_order / 3)


class CNNEncoder(nn.Module):
    """The same layer schedule with plain convs of sqrt(2N/3) x as many channels as the equivariant layer has
    regular fields: a pair of C_N regular fields linked by a 3x3 kernel has about 6N free parameters (a plain
    channel pair 9), so the parameter counts match within a few percent (both are printed at start-up)."""

    def __init__(self, args):
        super().__init__()
        scale, layers, channels = cnn_width_scale(args.group_order), [], 2
        for width, padding, pool in layer_plan(args.n_hidden, args.image_size):
            out_channels = max(1, round(scale * width))
            layers += [nn.Conv2d(channels, out_channels, 3, padding=padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = out_channels
        self.out_channels = channels
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x):
        return self.net(x)


class CNNActor(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.encoder = CNNEncoder(args)
        self.head = nn.Linear(self.encoder.out_channels, 10)

    def forward(self, x):
        out = self.head(self.encoder(x))
        return out[:, :5], out[:, 5:].clamp(LOG_STD_MIN, LOG_STD_MAX)


class CNNCritic(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.encoder = CNNEncoder(args)
        hidden = round(cnn_width_scale(args.group_order) * args.n_hidden)
        self.q1, self.q2 = [
            nn.Sequential(nn.Linear(self.encoder.out_channels + 5, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
            for _ in range(2)
        ]

    def encode(self, x):
        return self.encoder(x)

    def q_values(self, features, action):
        joint = torch.cat([features, action], dim=1)
        return self.q1(joint).flatten(), self.q2(joint).flatten()

    def forward(self, x, action):
        return self.q_values(self.encode(x), action)


def build_networks(args) -> tuple[nn.Module, nn.Module]:
    if args.model == "equi":
        return EquiActor(args), EquiCritic(args)
    return CNNActor(args), CNNCritic(args)


def sample_action(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterised tanh-squashed Gaussian sample in [-1, 1]^5 and its log-probability."""
    std = log_std.exp()
    pre_tanh = mean + std * torch.randn_like(mean)
    action = torch.tanh(pre_tanh)
    log_prob = torch.distributions.Normal(mean, std).log_prob(pre_tanh) - torch.log(1 - action.pow(2) + 1e-6)
    return action, log_prob.sum(1)


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
def make_envs(args, num_envs: int, asynchronous: bool = False, video_folder: Optional[str] = None):
    def thunk(idx: int):
        def make():
            render_mode = "rgb_array" if video_folder and idx == 0 else None
            env = gym.make(args.env_id, image_size=args.image_size, max_steps=args.max_steps, render_mode=render_mode)
            if render_mode:
                env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda e: True)
            return env

        return make

    vector_cls = gym.vector.AsyncVectorEnv if asynchronous and num_envs > 1 else gym.vector.SyncVectorEnv
    envs = vector_cls([thunk(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def obs_to_tensor(obs: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, 2, S, S) from the env -> float in [0, 1]: height / 255, holding flag 0/1."""
    return torch.as_tensor(obs, device=device).float().div_(255.0)


def stored_obs_to_tensor(heights: np.ndarray, holding: np.ndarray, device: torch.device) -> torch.Tensor:
    """The compact stored form (height channel uint8 (B, S, S), holding flag bool (B,)) -> the float (B, 2, S, S)
    that `obs_to_tensor` makes of the env's observation (the replay buffer and offline datasets store this form)."""
    heights = torch.as_tensor(heights, device=device).float().div_(255.0)
    flag = torch.as_tensor(holding, device=device).float()
    return torch.stack([heights, flag[:, None, None].expand_as(heights)], dim=1)


def action_smoothness(actions: np.ndarray) -> float:
    """CAPS's smoothness measure of one episode's executed actions (T x 5): the amplitude-weighted mean frequency
    of their spectrum, Sm = 2 / (n f_s) sum_i M_i f_i with f_s = 1 per step, averaged over action dimensions.
    0 for a constant action sequence; larger means more high-frequency jitter."""
    if len(actions) < 2:
        return 0.0
    spectrum = np.abs(np.fft.rfft(actions, axis=0))  # (n_freq, 5)
    freqs = np.fft.rfftfreq(len(actions))[:, None]
    return float((2.0 / len(freqs) * (spectrum * freqs).sum(0)).mean())


def evaluate(actor: nn.Module, args, device: torch.device, seed: int,
             video_folder: Optional[str] = None) -> dict[str, float]:
    """Run `args.eval_episodes` episodes with the deterministic action tanh(mean); return the mean success rate,
    discounted return (gamma^(T-1) for success at step T: the papers' metric), length and action smoothness."""
    num_envs = min(args.num_eval_envs, args.eval_episodes)
    quota = [args.eval_episodes // num_envs + (i < args.eval_episodes % num_envs) for i in range(num_envs)]
    envs = make_envs(args, num_envs, video_folder=video_folder)
    obs, _ = envs.reset(seed=seed)
    returns, successes, lengths, smooth, change = [], [], [], [], []
    episode_actions: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
    discounted, steps = np.zeros(num_envs), np.zeros(num_envs, dtype=int)
    resetting = np.zeros(num_envs, dtype=bool)
    with torch.no_grad():
        actor.eval()  # escnn: expand the filters once for the whole evaluation (no updates happen in between)
        while any(q > 0 for q in quota):
            actions = torch.tanh(actor(obs_to_tensor(obs, device))[0]).cpu().numpy()
            obs, rewards, terminations, truncations, infos = envs.step(actions)
            for i in range(num_envs):
                if resetting[i] or quota[i] == 0:  # this step reset env i (its action was ignored), or it is done
                    continue
                discounted[i] += args.gamma ** steps[i] * rewards[i]
                steps[i] += 1
                episode_actions[i].append(actions[i])
                if terminations[i] or truncations[i]:
                    acts = np.array(episode_actions[i])
                    returns.append(discounted[i])
                    successes.append(float(infos["is_success"][i]))
                    lengths.append(steps[i])
                    smooth.append(action_smoothness(acts))
                    change.append(float(np.linalg.norm(np.diff(acts, axis=0), axis=1).mean()) if len(acts) > 1 else 0.0)
                    quota[i] -= 1
                    discounted[i], steps[i], episode_actions[i] = 0.0, 0, []
            resetting = np.logical_or(terminations, truncations)
    actor.train()  # back to rebuilding the filters at every forward, for the next updates
    envs.close()
    return {"success_rate": float(np.mean(successes)), "discounted_return": float(np.mean(returns)),
            "episode_length": float(np.mean(lengths)), "action_smoothness": float(np.mean(smooth)),
            "action_change": float(np.mean(change))}


def format_eval(result: dict[str, float]) -> str:
    return (f"success {result['success_rate']:.3f} | discounted return {result['discounted_return']:.4f} | "
            f"length {result['episode_length']:.2f} | smoothness {result['action_smoothness']:.6f} | "
            f"action change {result['action_change']:.6f}")


def load_actor(path: str, script: str, device: torch.device) -> tuple[nn.Module, SimpleNamespace]:
    """Rebuild the actor saved by `script` (sac_equi_bullet, cql_equi_offline, iql_equi_offline) with --save-model;
    returns it with the saved settings. Fails with one sentence if the file is missing, foreign or does not fit."""
    checkpoint = load_checkpoint(path, script)
    saved = SimpleNamespace(**checkpoint["args"])
    if "actor" not in checkpoint or not all(hasattr(saved, k) for k in ("model", "group_order", "n_hidden")):
        fail(f"checkpoint {path!r} holds no actor of a manipulation script.")
    actor = build_networks(saved)[0]
    load_state(actor, checkpoint["actor"], path)
    return actor.to(device), saved


def run_evaluation(args, script: str) -> None:
    """A script's `--eval-checkpoint` path: rebuild the saved actor and report `args.eval_episodes` episodes."""
    if args.eval_episodes < 1:
        fail("--eval-episodes must be at least 1.")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    actor, saved = load_actor(args.eval_checkpoint, script, device)
    saved.eval_episodes, saved.num_eval_envs = args.eval_episodes, args.num_eval_envs
    video_folder = f"videos/{saved.env_id.replace('/', '_')}__{saved.exp_name}__eval" if args.capture_video else None
    result = evaluate(actor, saved, device, seed=saved.seed + 10_000, video_folder=video_folder)
    print(f"{saved.env_id} ({saved.model}): {format_eval(result)} over {args.eval_episodes} episodes", flush=True)
