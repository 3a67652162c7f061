"""Equivariant IQL on offline datasets of the close-loop manipulation tasks.

Implicit Q-Learning (Kostrikov, Nair, Levine 2021, arXiv 2110.06169) with the C_N-equivariant actor and invariant
twin critic of sac_equi_bullet.py and an invariant state value V, as in "Equivariant Offline Reinforcement Learning"
(Tangri et al. 2024, arXiv 2406.13961). It never queries Q at actions outside the data: V(s) is fitted as an upper
expectile of Q(s, a) over the data's actions, Q(s, a) regresses on r + gamma V(s'), and the policy is extracted by
advantage-weighted regression, log pi(a|s) of the data's action weighted by exp(A / beta). The policy is the same
tanh-squashed Gaussian the agent deploys (deterministic action tanh(mean)), and the log-probability of a data
action is taken through the squashing, so what is trained is what runs. `--model cnn` trains the plain baseline.

Smooth, gentle motion: CAPS (Mysore et al. 2021, "Regularizing Action Policies for Smooth Control with
Reinforcement Learning") adds a temporal term (the policy's action at s_t vs at s_{t+1}) and a spatial term (at s
vs at a perturbed s) to the advantage-weighted actor loss (`--caps-temporal-weight`, `--caps-spatial-weight`; off
by default).

The env settings are BulletArm's defaults (`BulletArmEnvArgs`: a 0.3 m workspace, pi/4 rotation steps, 50-step
episodes), in which the datasets are collected. A dataset records the settings it was collected in; a run whose
settings differ refuses it (with the flags to pass), and evaluates in the run's settings, which are the dataset's.
With no `--dataset`, a small planner dataset of `--env-id` in these settings is built once (cached) and used, so
this just works:

    uv run python iql_equi_offline.py
    uv run python -m cleanrl_equi.tools.make_dataset --env-id cleanrl_equi/BlockInBowl-v0 --quality expert --num-episodes 10
    uv run python iql_equi_offline.py --env-id cleanrl_equi/BlockInBowl-v0 --dataset datasets/<file>.npz --model cnn
    uv run python iql_equi_offline.py --eval-checkpoint runs/<run>/iql_equi_offline.cleanrl_model
"""

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.checkpoints import load_checkpoint, load_state, saved_weights  # PLUMBING
from cleanrl_equi.compile import channels_last, check_compile_flags, compiled, with_bf16_autocast  # SPEED
from cleanrl_equi.datasets import default_dataset, load_dataset
from cleanrl_equi.envs.manipulation import BulletArmEnvArgs, evaluate, evaluate_checkpoint, format_eval, rotate_batch
from cleanrl_equi.envs.manipulation.rollouts import tanh_of_mean
from cleanrl_equi.equivariant import EscnnModule, TensorToField, count_parameters, enn, gspaces, planar_action_type
from cleanrl_equi.equivariant import plain_copy, refresh  # SPEED
from cleanrl_equi.traceable import through_traced  # SPEED
from cleanrl_equi.errors import fail, require
from cleanrl_equi.run import Run, device_for  # PLUMBING

SCRIPT = os.path.basename(__file__)[: -len(".py")]


@dataclass
class Args(BulletArmEnvArgs):
    exp_name: str = SCRIPT
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanrl-equi"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the final evaluation episodes (check out `videos` folder)"""
    save_model: bool = False
    """whether to save the model to `runs/{run_name}` at the end, then evaluate it"""
    eval_checkpoint: Optional[str] = None  # PLUMBING
    """evaluate this saved model (a `.cleanrl_model` file) for `eval_episodes` episodes instead of training"""
    run_name: Optional[str] = None  # PLUMBING
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it
    holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0  # PLUMBING
    """write the resume file runs/{run_name}/resume.pt every this many minutes (0 = only on a USR1/TERM signal)"""

    # Data and environment: the task and its settings come from BulletArmEnvArgs (BulletArm's defaults, the offline
    # paper's and the datasets'); they must be the dataset's, and the evaluation envs take them
    dataset: Optional[str] = None
    """an offline dataset file (`python -m cleanrl_equi.tools.make_dataset`); default: a cached planner dataset of
    env_id in these env settings"""
    default_dataset_episodes: int = 10
    """episodes of the default planner dataset built when no --dataset is given (the paper's 10 expert demos)"""

    # Networks
    model: Literal["equi", "cnn"] = "equi"
    """`equi`: C_N-equivariant actor and invariant critic (escnn); `cnn`: plain CNNs of a similar parameter count"""
    group_order: int = 8
    """N of the rotation group C_N (the paper's C8); `cnn` uses it only to match the parameter count"""
    n_hidden: int = 64
    """width n of the networks: the encoder has n/8, n/4, n/2, n, 2n, n, n regular fields (paper: 64)"""

    # Algorithm
    total_timesteps: int = 100000
    """gradient steps (offline: one step = one batch; the global step of every scalar)"""
    batch_size: int = 8
    """transitions per gradient step (the paper's 8)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target network Polyak coefficient"""
    policy_lr: float = 1e-4
    """the learning rate of the actor's optimizer"""
    q_lr: float = 1e-4
    """the learning rate of the critic's (twin Q) optimizer"""
    value_lr: float = 1e-4
    """the learning rate of the state value's optimizer"""
    expectile: float = 0.8
    """expectile tau of the value loss: V(s) tracks the tau-expectile of Q(s, a) over the data (the paper's 0.8)"""
    beta: float = 0.5
    """AWR temperature: weights exp(A / beta) (the paper's 0.5; CORL's inverse temperature 3 is beta = 1/3)"""
    max_exp_advantage: float = 100.0
    """clip of the exponentiated advantages, so a few large advantages cannot dominate a batch (CORL's 100; the
    paper's code has none; with values in [0, 1], exp(A / 0.5) stays near or below e^2 = 7.4, far from the clip)"""
    augment: bool = True
    """rotate every batch by random angles (image and (dx, dy) together), for equi and cnn alike (the paper's)"""

    # Smooth-motion prior (CAPS)
    caps_temporal_weight: float = 0.0
    """CAPS temporal term: weight of |mu(s_t) - mu(s_t+1)|^2 in the actor loss (0 = off)"""
    caps_spatial_weight: float = 0.0
    """CAPS spatial term: weight of |mu(s) - mu(s + noise)|^2 in the actor loss (0 = off)"""
    caps_sigma: float = 0.01
    """std of the Gaussian noise on the height channel (in [0, 1] image units; 0.01 = 2.55 mm) for the spatial term"""

    # Evaluation and logging
    eval_frequency: int = 1000
    """evaluate every this many gradient steps (and at the end)"""
    eval_episodes: int = 100
    """episodes per evaluation, with the deterministic action tanh(mean)"""
    num_eval_envs: int = 5
    """parallel environments used by evaluation"""
    log_frequency: int = 100
    """write the loss scalars every this many gradient steps"""
    progress_interval: float = 30.0  # PLUMBING
    """seconds between progress lines on stdout"""
    compile: bool = False  # SPEED
    """torch.compile the update step (value, critic, actor, target update) and the evaluation's acting: the same
    algorithm. escnn layers cannot be traced (they run eagerly between the compiled parts of the update); the
    equivariant actor acts through a plain-torch copy"""
    cudagraphs: bool = False  # SPEED
    """like --compile, and replay each step as a recorded CUDA graph (torch.compile "reduce-overhead" mode; GPU only)"""
    bf16: bool = False  # SPEED
    """run the networks' forward passes in the updates in bfloat16 mixed precision (torch.autocast; weights,
    optimizer state, log-probabilities, Q values and losses stay float32); CPUs with AVX512-BF16/AMX and recent GPUs"""


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence, on settings that cannot work."""
    args.check_env_settings()
    if args.group_order < 2 or (args.group_order != 2 and args.group_order % 4 != 0):
        fail(f"--group-order {args.group_order} does not contain the 90-degree turns of the pixel grid; "
             "use 4, 8, 12, 16 (or 2).")
    if args.n_hidden < 8 or args.n_hidden % 8 != 0:
        fail(f"--n-hidden {args.n_hidden} must be a multiple of 8 (the first layer has n/8 fields).")
    require(args, positive=("policy_lr", "q_lr", "value_lr", "beta", "max_exp_advantage", "caps_sigma"),
            fractions=("gamma", "tau"), non_negative=("caps_temporal_weight", "caps_spatial_weight"),
            at_least_one=("total_timesteps", "batch_size", "eval_frequency", "eval_episodes", "num_eval_envs",
                          "log_frequency", "default_dataset_episodes"))
    if not 0 < args.expectile < 1:
        fail(f"--expectile must lie strictly between 0 and 1 (0.5 = mean, the paper's 0.8), not {args.expectile}.")
    check_compile_flags(args, device_for(args))  # SPEED


# ---- Networks -----------------------------------------------------------------------------------------------------
# Symmetry: turning the world by g in C_N about the gripper axis turns the image by g, turns the best (dx, dy) by g and
# leaves p, dz, dtheta and the value unchanged. So the encoder maps the image to regular fields of C_N (features that
# turn along with it), the actor outputs (dx, dy) as one vector field and everything else as invariant fields, and
# the critic and the state value pool over the group before their outputs, so Q and V are invariant. The CNN
# baseline is the same schedule with plain convolutions; the two sit side by side so a diff of the two shows where
# the symmetry enters.
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


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


class EquiEncoder(EscnnModule):
    """2 x S x S image (height and holding flag, both invariant fields) -> n regular fields of C_N at 1 x 1: features
    that turn with the image."""

    def __init__(self, args: Args):
        super().__init__()
        gspace = gspaces.rot2dOnR2(args.group_order)
        self.in_type = enn.FieldType(gspace, 2 * [gspace.trivial_repr])
        layers, field_type = [], self.in_type
        for width, padding, pool in layer_plan(args.n_hidden, args.image_size):
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
    """Gaussian policy: a 1x1 conv from the encoder to the (dx, dy) mean as one vector field, which turns with the
    image, and the means of p, dz, dtheta and the five log-stds as eight invariant fields."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = EquiEncoder(args)
        gspace = self.encoder.out_type.gspace
        self.head = enn.R2Conv(self.encoder.out_type, planar_action_type(gspace, 8), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.encoder(x)).tensor.flatten(1).float()  # float32 under --bf16: log-probs come from it
        mean = torch.cat([out[:, 2:3], out[:, 0:2], out[:, 3:5]], dim=1)  # (dx, dy, p, dz, dtheta) -> (p, dx, ...)
        return mean, out[:, 5:10].clamp(LOG_STD_MIN, LOG_STD_MAX)


class EquiCritic(EscnnModule):
    """Twin Q on one encoder: the action joins the features at 1 x 1 ((dx, dy) as a vector field, p, dz, dtheta as
    invariant fields); each head is a 1x1 conv to n regular fields, ReLU, a max over the group (which makes Q
    invariant) and a 1x1 conv to one Q value."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = EquiEncoder(args)
        gspace = self.encoder.out_type.gspace
        self.joint_type = self.encoder.out_type + planar_action_type(gspace, 3)  # features, (dx, dy), p, dz, dtheta
        hidden_type = enn.FieldType(gspace, args.n_hidden * [gspace.regular_repr])
        pooled_type = enn.FieldType(gspace, args.n_hidden * [gspace.trivial_repr])
        q_type = enn.FieldType(gspace, [gspace.trivial_repr])
        self.q1, self.q2 = [
            enn.SequentialModule(enn.R2Conv(self.joint_type, hidden_type, 1), enn.ReLU(hidden_type, inplace=True),
                                 enn.GroupPooling(hidden_type), enn.R2Conv(pooled_type, q_type, 1))
            for _ in range(2)
        ]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).tensor

    def q_values(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fields = action[:, [1, 2, 0, 3, 4]].reshape(-1, 5, 1, 1)  # (dx, dy) first, as the field type lists them
        joint = enn.GeometricTensor(torch.cat([features, fields], dim=1), self.joint_type)
        return self.q1(joint).tensor.flatten().float(), self.q2(joint).tensor.flatten().float()  # float32 (--bf16)

    def forward(self, x: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_values(self.encode(x), action)


class EquiValue(EscnnModule):
    """State value on one encoder: a 1x1 conv to n regular fields, ReLU, a max over the group (which makes V
    invariant: turning the scene cannot change it) and a 1x1 conv to one value."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = EquiEncoder(args)
        gspace = self.encoder.out_type.gspace
        hidden_type = enn.FieldType(gspace, args.n_hidden * [gspace.regular_repr])
        pooled_type = enn.FieldType(gspace, args.n_hidden * [gspace.trivial_repr])
        v_type = enn.FieldType(gspace, [gspace.trivial_repr])
        self.head = enn.SequentialModule(enn.R2Conv(self.encoder.out_type, hidden_type, 1),
                                         enn.ReLU(hidden_type, inplace=True),
                                         enn.GroupPooling(hidden_type), enn.R2Conv(pooled_type, v_type, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).tensor.flatten().float()  # float32 (--bf16)


def cnn_width_scale(group_order: int) -> float:
    """A pair of C_N regular fields linked by a 3x3 kernel has about 6N free parameters, a pair of plain channels 9:
    sqrt(2N/3) x as many channels as regular fields matches the parameter counts within a few percent."""
    return math.sqrt(2 * group_order / 3)


class CNNEncoder(nn.Module):
    """2 x S x S image (height and holding flag) -> `cnn_width_scale` x n plain channels at 1 x 1: the equivariant
    encoder's layer schedule with plain convolutions."""

    def __init__(self, args: Args):
        super().__init__()
        scale = cnn_width_scale(args.group_order)
        layers, channels = [], 2
        for width, padding, pool in layer_plan(args.n_hidden, args.image_size):
            out_channels = max(1, round(scale * width))
            layers += [nn.Conv2d(channels, out_channels, 3, padding=padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = out_channels
        self.out_channels = channels
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNNActor(nn.Module):
    """Gaussian policy: a linear layer from the encoder to the means of (p, dx, dy, dz, dtheta) and the five
    log-stds."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = CNNEncoder(args)
        self.head = nn.Linear(self.encoder.out_channels, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.encoder(x)).float()  # float32 under --bf16: log-probs come from it
        mean = out[:, 0:5]  # (p, dx, dy, dz, dtheta)
        return mean, out[:, 5:10].clamp(LOG_STD_MIN, LOG_STD_MAX)


class CNNCritic(nn.Module):
    """Twin Q on one encoder: the action joins the features; each head is a linear layer to `cnn_width_scale` x n
    units, ReLU and a linear layer to one Q value."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = CNNEncoder(args)
        hidden = round(cnn_width_scale(args.group_order) * args.n_hidden)
        self.q1, self.q2 = [
            nn.Sequential(nn.Linear(self.encoder.out_channels + 5, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
            for _ in range(2)
        ]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def q_values(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joint = torch.cat([features, action], dim=1)
        return self.q1(joint).flatten().float(), self.q2(joint).flatten().float()  # float32 (--bf16)

    def forward(self, x: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_values(self.encode(x), action)


class CNNValue(nn.Module):
    """State value on one encoder: a linear layer to `cnn_width_scale` x n units, ReLU and a linear layer to one
    value."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = CNNEncoder(args)
        hidden = round(cnn_width_scale(args.group_order) * args.n_hidden)
        self.head = nn.Sequential(nn.Linear(self.encoder.out_channels, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).flatten().float()  # float32 (--bf16)


def load_actor(path: str, device: torch.device) -> tuple[nn.Module, Args]:  # PLUMBING: --eval-checkpoint
    """The actor saved with --save-model and the settings it was trained with (one sentence if it does not fit); a
    model saved before the env settings were recorded was trained in BulletArm's, the defaults of Args."""
    checkpoint = load_checkpoint(path, SCRIPT)
    saved = Args(**{k: v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__})
    actor = EquiActor(saved) if saved.model == "equi" else CNNActor(saved)
    load_state(actor, saved_weights(checkpoint, "actor", path), path)
    return actor.to(device), saved


# ---- Losses -------------------------------------------------------------------------------------------------------
def expectile_loss(q: torch.Tensor, v: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared error |tau - 1(q - v < 0)| (q - v)^2 (IQL eq. 5): with tau > 0.5, V under Q costs more
    than V over Q, so V(s) settles at an upper expectile of Q(s, a) over the data's actions at s."""
    diff = q - v
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def awr_loss(log_prob: torch.Tensor, advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Advantage-weighted regression (IQL eq. 7): maximise exp(A / beta) log pi(a|s) on the data's actions; the
    weights are clipped at `max_weight` and carry no gradient (they only say how much each sample counts)."""
    weight = torch.exp(advantage.detach() / beta).clamp(max=max_weight)
    return -(weight * log_prob).mean()


def squashed_log_prob(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of the tanh-squashed Gaussian the agent acts with (deterministic action tanh(mean)), for a data
    action a in [-1, 1]^5: the Gaussian density of atanh(a) minus the log-Jacobian of tanh. Planner actions hit
    the bounds exactly, so they are pulled in by 1e-4 first (atanh(+-1) is infinite)."""
    clipped = action.clamp(-1.0 + 1e-4, 1.0 - 1e-4)
    pre_tanh = torch.atanh(clipped)
    log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(pre_tanh)
    return (log_prob - torch.log(1 - clipped.pow(2) + 1e-6)).sum(1)


def caps_terms(actor: nn.Module, obs: torch.Tensor, next_obs: torch.Tensor, sigma: float,
               mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CAPS smoothness terms on the deterministic action tanh(mean): temporal |a(s_t) - a(s_t+1)|^2 and spatial
    |a(s) - a(s~)|^2 with s~ = s plus Gaussian noise of std `sigma` on the height channel (the holding flag is a
    fact, not a measurement, so it is not perturbed). Squared distances: zero for a constant policy, and smooth."""
    action = torch.tanh(actor(obs)[0] if mean is None else mean)
    temporal = (action - torch.tanh(actor(next_obs)[0])).pow(2).sum(1).mean()
    noisy = obs.clone()
    noisy[:, 0] += sigma * torch.randn_like(noisy[:, 0])
    spatial = (action - torch.tanh(actor(noisy)[0])).pow(2).sum(1).mean()
    return temporal, spatial


# ---- Update step ----------------------------------------------------------------------------------------------------
def update_step(actor: nn.Module, critic: nn.Module, critic_target: nn.Module, value: nn.Module, actor_optimizer,
                critic_optimizer, value_optimizer, args: Args, batch: dict) -> dict[str, torch.Tensor]:
    """One gradient step of IQL on a batch: value, critic, actor, then the target critic. One function, so that
    `--compile` compiles all of it (the three losses share the batch and the target critic's Q). Returns the
    statistics the loop logs, by their scalar names, as detached tensors, without reading any value back to the
    host (no `.item()`)."""
    obs, next_obs, actions = batch["obs"], batch["next_obs"], batch["actions"]

    # Value: V(s) towards the upper expectile of the target critic's min Q(s, a) on the data's action. The
    # TD target's V(s') is taken first, so all three losses see the networks of the same step (as in IQL).
    with torch.no_grad():
        target_q = torch.min(*critic_target(obs, actions))
        next_q_value = batch["rewards"] + (1 - batch["terminated"]) * args.gamma * value(next_obs)
    v = value(obs)
    value_loss = expectile_loss(target_q, v, args.expectile)
    value_optimizer.zero_grad()
    value_loss.backward()
    value_optimizer.step()

    # Critic: Q(s, a) towards r + gamma V(s') (no max over actions: V already is the in-data "best")
    qf1_a_values, qf2_a_values = critic(obs, actions)
    qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
    qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
    qf_loss = qf1_loss + qf2_loss
    critic_optimizer.zero_grad()
    qf_loss.backward()
    critic_optimizer.step()

    # Actor: advantage-weighted log-likelihood of the data's action, A = min Q_target(s, a) - V(s)
    advantage = target_q - v.detach()
    mean, log_std = actor(obs)
    log_prob = squashed_log_prob(mean, log_std, actions)
    actor_loss = awr_loss(log_prob, advantage, args.beta, args.max_exp_advantage)
    caps_temporal = caps_spatial = torch.zeros((), device=obs.device)
    if args.caps_temporal_weight > 0 or args.caps_spatial_weight > 0:  # smooth-motion prior on tanh(mean)
        caps_temporal, caps_spatial = caps_terms(actor, obs, next_obs, args.caps_sigma, mean)
        actor_loss = actor_loss + args.caps_temporal_weight * caps_temporal + args.caps_spatial_weight * caps_spatial
    actor_optimizer.zero_grad()
    actor_loss.backward()
    actor_optimizer.step()

    with torch.no_grad():
        for param, target_param in zip(critic.parameters(), critic_target.parameters()):
            target_param.lerp_(param, args.tau)
    return {"qf1_values": qf1_a_values.detach(), "qf2_values": qf2_a_values.detach(),
            "qf1_loss": qf1_loss.detach(), "qf2_loss": qf2_loss.detach(), "qf_loss": qf_loss.detach() / 2,
            "value_loss": value_loss.detach(), "values": v.detach(), "advantage": advantage,
            "actor_loss": actor_loss.detach(), "log_prob": log_prob.detach(), "caps_temporal": caps_temporal.detach(),
            "caps_spatial": caps_spatial.detach()}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:  # PLUMBING: evaluate a saved model instead of training
        evaluate_checkpoint(*load_actor(args.eval_checkpoint, device_for(args)), args, device_for(args))
        raise SystemExit(0)
    check_args(args)
    dataset_path = args.dataset or default_dataset(args.env_settings(), num_episodes=args.default_dataset_episodes)
    data = load_dataset(dataset_path, env_settings=args.env_settings())  # refuses data of other env settings
    if len(data) < args.batch_size:
        fail(f"dataset {dataset_path!r} holds {len(data)} transitions, fewer than --batch-size {args.batch_size}; "
             "lower --batch-size or collect more episodes.")
    print(f"dataset {dataset_path}: {data.num_episodes} episodes, {len(data)} transitions, "
          f"{data.metadata.get('quality', '?')} data", flush=True)

    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run = Run(SCRIPT, args, run_name)  # PLUMBING: --run-name or the SLURM job's; resume file, signals
    run_name = run.name  # PLUMBING
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    run.attach(writer)  # PLUMBING: a resumed run's curves continue where its resume file left them

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    actor = (EquiActor(args) if args.model == "equi" else CNNActor(args)).to(device)
    critic = (EquiCritic(args) if args.model == "equi" else CNNCritic(args)).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    value = (EquiValue(args) if args.model == "equi" else CNNValue(args)).to(device)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    value_optimizer = torch.optim.Adam(value.parameters(), lr=args.value_lr)
    print(f"{args.model} networks: actor {count_parameters(actor):,} + critic {count_parameters(critic):,} + value "
          f"{count_parameters(value):,} parameters", flush=True)

    # PLUMBING: what a resumed run continues from
    run.keep(actor=actor, critic=critic, critic_target=critic_target, value=value,  # PLUMBING
             actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer, value_optimizer=value_optimizer)
    counters = dict(global_step=0, best={"success_rate": -1.0, "discounted_return": -1.0})
    counters = run.resume(**counters)  # PLUMBING
    global_step, best, last_success = counters["global_step"], counters["best"], float("nan")

    acting_actor, policy, update = actor, tanh_of_mean, update_step
    # SPEED: bfloat16 autocast over the update; torch.compile of the update and of the evaluation's acting (the
    # SPEED: learning rates are constant, so the compiled optimizer steps never recompile)
    update = with_bf16_autocast(update, args, device)  # SPEED
    acting_actor = plain_copy(actor) if args.compile else actor  # SPEED: plain-torch copy (dynamo cannot trace escnn)
    policy, update = compiled(policy, args), compiled(update, args)  # SPEED
    update = through_traced(update, actor, critic, critic_target, value) if args.compile else update  # SPEED: traceable

    start_time = time.time()
    while global_step < args.total_timesteps:
        global_step += 1
        batch = data.sample(args.batch_size, device)
        if args.augment:  # one random turn per transition, for both models (the paper augments every batch)
            batch = rotate_batch(batch, torch.rand(args.batch_size, device=device) * 2 * math.pi)
        batch = channels_last(batch)  # SPEED
        stats = update(actor, critic, critic_target, value, actor_optimizer, critic_optimizer, value_optimizer, args,
                       batch)
        if global_step % args.log_frequency == 0:
            for key, statistic in stats.items():
                writer.add_scalar(f"losses/{key}", statistic.mean().item(), global_step)
            sps = int(global_step / (time.time() - start_time))
            sps = int(run.sps(global_step))  # PLUMBING: the steps of this process (a resumed run counts anew)
            writer.add_scalar("charts/SPS", sps, global_step)

        final = global_step == args.total_timesteps
        if global_step % args.eval_frequency == 0 or final:
            refresh(acting_actor, actor)  # SPEED: the plain copy takes the updated weights
            result = evaluate(acting_actor, args, device, seed=args.seed + 10_000 + global_step, act=policy)
            for key, number in result.items():
                writer.add_scalar(f"eval/{key}", number, global_step)
            for key in ("success_rate", "discounted_return"):
                best[key] = max(best[key], result[key])
                writer.add_scalar(f"eval/best_{key}", best[key], global_step)
            last_success = result["success_rate"]
            print(f"eval @ {global_step} gradient steps: "
                  f"{format_eval(result, args.eval_episodes, args.seed + 10_000 + global_step)}", flush=True)
        run.progress(global_step, args.total_timesteps, f"last eval success {last_success:.2f}",  # PLUMBING
                     f"best {best['success_rate']:.2f}" if best["success_rate"] >= 0 else "best -", force=final)
        run.checkpoint(global_step=global_step, best=best)  # PLUMBING: periodic resume file; stop on USR1/TERM

    if args.save_model:  # PLUMBING: the model file, with the script's name and settings
        run.save_model(actor=actor.state_dict(), critic=critic.state_dict(),
                       critic_target=critic_target.state_dict(), value=value.state_dict(),
                       global_step=global_step, dataset=dataset_path)
    if args.save_model or args.capture_video:  # the final policy, greedy, on the evaluation scenes (and on video)
        refresh(acting_actor, actor)  # SPEED: the plain copy takes the updated weights
        result = evaluate(acting_actor, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run_name}-eval" if args.capture_video else None, act=policy)
        print(f"final eval: {format_eval(result, args.eval_episodes, args.seed + 10_000)}", flush=True)
    run.finish(global_step=global_step, best=best)  # PLUMBING: the resume file marks the end, for extending
    writer.close()
