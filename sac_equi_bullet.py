"""Equivariant SAC / SACfD on the close-loop manipulation tasks, with an optional smooth-motion prior (CAPS).

Soft Actor-Critic (Haarnoja et al. 2018, arXiv 1812.05905) with C_N-equivariant networks as in "SO(2)-Equivariant
Reinforcement Learning" (Wang, Walters, Platt, ICLR 2022): a top-down height image centred on the gripper is a
signal on the plane, so turning the world about the gripper's vertical axis turns the image, turns the best
(dx, dy) by the same angle, and leaves the gripper command, dz, dtheta and the value unchanged. The actor is
built equivariant and the critic invariant (escnn), so what is learned in one orientation holds in all of them.
Planner demonstrations are put in the replay buffer before learning; SACfD adds an expert term to the actor loss
(weight `--demo-loss-weight`, 0 = plain SAC); every sampled transition may be replaced by a copy rotated by a
random angle (`--aug-copies`, the paper's buffer augmentation). `--model cnn` trains the plain-CNN baseline of a
similar parameter count from this same file.

The defaults are the paper's setting, not BulletArm's later env defaults: a 0.4 m workspace seen as 128 px over
0.6 m, steps of 0.05 m and pi/8, 100-step episodes, 5 envs, 20 demos, and the paper's task sizes and success
thresholds (`--paper-tasks`; e.g. 10 x 10 x 5 cm blocks in Block Pulling). BulletArm's:
`--workspace-size 0.3 --drot-n 4 --max-steps 50 --no-paper-tasks`.

Prioritised replay (`--prioritized-replay`), as the paper's SACfD on Block Stacking, House Building and Corner
Picking: a transition is drawn with probability p_i^alpha / sum_j p_j^alpha (alpha 0.6), p_i = |TD error| + 1e-6,
plus 1 for a demonstration; new transitions enter with the largest priority so far; the demonstrations are never
overwritten when the buffer wraps. Importance-sampling weights w_i = (N P(i))^-beta / max_j (N P(j))^-beta, beta
annealed from 0.4 to 1 over the run's gradient steps, weight each sample's critic loss. (The paper's code computed
these weights but did not use them; with them the critic fits the same targets uniform sampling would, once beta
is 1.) Rotated copies share the priority of the transition they were drawn from, where the paper stored each copy
with its own.

Smooth, gentle motion: CAPS (Mysore et al. 2021, "Regularizing Action Policies for Smooth Control with
Reinforcement Learning") adds a temporal term (the policy's action at s_t vs at s_{t+1}) and a spatial term (at s
vs at a perturbed s) to the actor loss (`--caps-temporal-weight`, `--caps-spatial-weight`; off by default). The env
adds optional reward shaping (`--action-rate-penalty`, `--force-penalty` above `--force-threshold`) and compliance
(`--gripper-force`, `--finger-force`). Evaluation logs how smooth and gentle the executed motion was, measured in the
physics at 240 Hz (`eval/action_smoothness`, `eval/mean_squared_jerk`, `eval/peak_grip_force`, `eval/drops`, ...;
cleanrl_equi/envs/manipulation/metrics.py defines each). Adversarial smoothness (`--smooth-adversarial-weight`)
replaces CAPS's random perturbation by the worst one within a small ball, found by projected gradient ascent.

Constrained SAC (SAC-Lagrangian, `--cost-limit`; off by default): maximise the return subject to an expected episode
cost of at most `--cost-limit`, where each step costs how far the env step's physics (grip force, impact force or
gripper jerk: `--cost-kind`) went above `--cost-threshold`. A cost critic of the reward critic's class (invariant in
the equivariant model) learns the discounted cost-to-go Q_c, the actor maximises Q_r - lambda Q_c, and the multiplier
lambda >= 0 rises while Q_c (or, with `--lambda-update episodes`, the measured cost of the recent training episodes)
exceeds the budget and falls (to 0 at least) while it is under it. Unlike a fixed force penalty, force costs nothing
while the budget holds, so avoiding contact altogether is no longer the cheap way out.

    uv run python sac_equi_bullet.py --env-id cleanrl_equi/BlockPulling-v0 --total-timesteps 100000
    uv run python sac_equi_bullet.py --model cnn                         # the plain baseline
    uv run python sac_equi_bullet.py --demo-loss-weight 1                # SACfD
    uv run python sac_equi_bullet.py --env-id cleanrl_equi/BlockStacking-v0 --demo-loss-weight 1 --prioritized-replay
    uv run python sac_equi_bullet.py --cost-limit 1 --cost-kind grip --cost-threshold 40   # constrained SAC
    uv run python sac_equi_bullet.py --eval-checkpoint runs/<run>/sac_equi_bullet.cleanrl_model
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
import tyro

from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.buffers import PrioritizedReplayBuffer, ReplayBuffer, annealed_beta
from cleanrl_equi.checkpoints import load_checkpoint, load_state, saved_args, saved_weights  # PLUMBING
from cleanrl_equi.compile import channels_last, check_compile_flags, compiled, with_bf16_autocast  # SPEED
from cleanrl_equi.envs.manipulation import (ManipulationEnvArgs, evaluate, evaluate_checkpoint, format_eval,
                                            make_envs, obs_to_tensor, rotate_batch)
from cleanrl_equi.equivariant import EscnnModule, TensorToField, count_parameters, enn, gspaces, planar_action_type
from cleanrl_equi.equivariant import plain_copy, refresh  # SPEED
from cleanrl_equi.traceable import through_traced  # SPEED
from cleanrl_equi.errors import fail, require
from cleanrl_equi.run import Run, device_for  # PLUMBING

SCRIPT = os.path.basename(__file__)[: -len(".py")]


@dataclass
class Args(ManipulationEnvArgs):
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
    """whether to save the model to `runs/{run_name}` at the end"""
    eval_checkpoint: Optional[str] = None  # PLUMBING
    """evaluate this saved model (a `.cleanrl_model` file) for `eval_episodes` episodes instead of training"""
    run_name: Optional[str] = None  # PLUMBING
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it
    holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0  # PLUMBING
    """write the resume file runs/{run_name}/resume.pt (networks, optimisers, RNG and the replay buffer) every this
    many minutes (0 = only on a USR1/TERM signal)"""

    # Environment: the task and its settings come from ManipulationEnvArgs (the paper's setting by default)
    num_envs: int = 5
    """the number of parallel training environments (the paper's 5)"""
    async_envs: bool = False
    """run each environment in its own process (gymnasium's AsyncVectorEnv); worth it with spare CPU cores"""

    # Networks
    model: Literal["equi", "cnn"] = "equi"
    """`equi`: C_N-equivariant actor and invariant critic (escnn); `cnn`: plain CNNs of a similar parameter count"""
    group_order: int = 8
    """N of the rotation group C_N (the paper's C8); `cnn` uses it only to match the parameter count"""
    n_hidden: int = 64
    """width n of the networks: the encoder has n/8, n/4, n/2, n, 2n, n, n regular fields (paper: 64)"""

    # Algorithm
    total_timesteps: int = 100000
    """environment steps taken by the agent (demos not included); one gradient step per vector step"""
    buffer_size: int = 100000
    """replay buffer capacity in transitions (each observation stored once, as uint8)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.01
    """target network Polyak coefficient"""
    batch_size: int = 64
    """the batch size of samples from the replay buffer"""
    learning_starts: int = 100
    """gradient steps start once the buffer holds this many transitions (demos included)"""
    policy_lr: float = 1e-3
    """the learning rate of the actor's optimizer"""
    q_lr: float = 1e-3
    """the learning rate of the critic's and alpha's optimizers"""
    updates_per_step: int = 1
    """gradient steps per vector step (of `num_envs` transitions)"""
    alpha: float = 0.01
    """initial entropy regularization coefficient"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient (target entropy = -action dimension)"""
    num_demos: int = 20
    """planner demonstration episodes put in the buffer before learning (the paper's 20, for SAC and SACfD)"""
    demo_loss_weight: float = 0.0
    """SACfD: weight of the MSE between the sampled action and the expert action on demo samples (0 = plain SAC;
    the paper's SACfD: 1)"""
    prioritized_replay: bool = False
    """prioritised replay with protected demonstrations, weighted critic loss (the paper's SACfD buffer)"""
    per_alpha: float = 0.6
    """prioritised replay: sampling probability proportional to priority^alpha (the paper's 0.6)"""
    per_beta: float = 0.4
    """prioritised replay: importance-sampling exponent at the start, annealed to 1 at the last gradient step"""
    per_eps: float = 1e-6
    """prioritised replay: priority = |TD error| + this (+ the expert bonus), so every stored transition can be drawn"""
    per_expert_bonus: float = 1.0
    """prioritised replay: added to a demonstration's priority (the paper's 1)"""
    aug_copies: int = 4
    """buffer augmentation: each sampled transition is one of itself + this many copies rotated by random angles"""

    # Smooth motion: CAPS in the actor loss (off by default; the env's shaping and compliance are env settings)
    caps_temporal_weight: float = 0.0
    """CAPS temporal term: weight of |mu(s_t) - mu(s_t+1)|^2 in the actor loss (0 = off)"""
    caps_spatial_weight: float = 0.0
    """CAPS spatial term: weight of |mu(s) - mu(s + noise)|^2 in the actor loss (0 = off)"""
    caps_sigma: float = 0.01
    """std of the Gaussian noise on the height channel (in [0, 1] image units; 0.01 = 2.55 mm) for the spatial term"""
    smooth_adversarial_weight: float = 0.0
    """adversarial smoothness: weight of |a(s) - a(s + delta)|^2 in the actor loss, a = tanh(mean) and delta the
    perturbation of the height channel within an L-infinity ball that changes a most (0 = off)"""
    smooth_adversarial_radius: float = 0.01
    """radius of that L-infinity ball on the height channel (in [0, 1] image units; 0.01 = 2.55 mm)"""
    smooth_adversarial_steps: int = 3
    """projected signed-gradient ascent steps that search the ball for delta, from a uniform random start"""
    smooth_adversarial_step_size: Optional[float] = None
    """the size of each ascent step (default: 2.5 x radius / steps, so the search can cross the ball)"""

    # Constrained SAC (SAC-Lagrangian; off unless --cost-limit is given)
    cost_limit: Optional[float] = None
    """the budget of the expected episode cost (the sum of an episode's per-step costs, see --cost-kind); the
    actor maximises Q_r - lambda Q_c with a learned lambda >= 0 (None = unconstrained SAC)"""
    cost_kind: Literal["grip", "impact", "jerk"] = "grip"
    """what a step costs: max(0, x - threshold) / threshold, x the env step's peak gripper-object normal force
    (`grip`, N), peak normal force on one task body from the table and the other bodies (`impact`, N) or gripper
    mean squared jerk (`jerk`, m^2/s^6)"""
    cost_threshold: Optional[float] = None
    """the x above which a step costs (default: 20 N for grip and impact, the force penalty's; 1e6 m^2/s^6 for jerk)"""
    lambda_init: float = 0.0
    """the initial Lagrange multiplier lambda"""
    lambda_lr: float = 1e-3
    """the learning rate of lambda's optimizer (Adam, then lambda is projected back onto >= 0)"""
    lambda_update: Literal["critic", "episodes"] = "critic"
    """what lambda weighs against the budget: `critic`, the cost critic's mean Q_c(s, pi(s)) over the batch against
    the budget in Q_c's units; `episodes`, the measured cost of the recent training episodes against --cost-limit
    itself, as PPO-Lagrangian does"""
    lambda_cost_window: int = 20
    """with --lambda-update episodes: the training episodes' cost is averaged over about this many recent episodes
    (their plain mean until that many have ended, then a moving average with weight 1 / window)"""

    # Evaluation and logging
    eval_frequency: int = 500
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
    """torch.compile the acting step and the update steps (critic; actor, alpha and CAPS; target update): the same
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
    require(args, positive=("policy_lr", "q_lr", "alpha", "caps_sigma", "per_eps", "smooth_adversarial_radius",
                            "smooth_adversarial_step_size", "cost_threshold", "lambda_lr"),
            fractions=("gamma", "tau", "per_alpha", "per_beta"),
            non_negative=("num_demos", "aug_copies", "learning_starts", "demo_loss_weight", "caps_temporal_weight",
                          "caps_spatial_weight", "per_expert_bonus", "smooth_adversarial_weight", "cost_limit",
                          "lambda_init"),
            at_least_one=("total_timesteps", "num_envs", "num_eval_envs", "batch_size", "eval_frequency",
                          "eval_episodes", "log_frequency", "updates_per_step", "smooth_adversarial_steps",
                          "lambda_cost_window"))
    if args.lambda_update == "episodes" and args.cost_limit is None:
        fail("--lambda-update episodes steps the constraint's lambda; give the episode budget with --cost-limit.")
    if args.total_timesteps < args.num_envs:
        fail(f"--total-timesteps {args.total_timesteps} is less than one step of the {args.num_envs} envs; raise it.")
    if args.buffer_size < max(args.batch_size, args.learning_starts, 2 * args.num_envs):
        fail(f"--buffer-size {args.buffer_size} is smaller than a batch or --learning-starts; raise it.")
    if args.learning_starts < args.batch_size:
        fail(f"--learning-starts {args.learning_starts} is less than --batch-size {args.batch_size}: the first batch "
             "would be larger than the data; raise --learning-starts.")
    if args.demo_loss_weight > 0 and args.num_demos == 0:
        fail("--demo-loss-weight needs demonstrations; set --num-demos to at least 1 (or the weight to 0).")
    check_compile_flags(args, device_for(args))  # SPEED


# ---- Networks -----------------------------------------------------------------------------------------------------
# Symmetry: turning the world by g in C_N about the gripper axis turns the image by g, turns the best (dx, dy) by g and
# leaves p, dz, dtheta and the value unchanged. So the encoder maps the image to regular fields of C_N (features that
# turn along with it), the actor outputs (dx, dy) as one vector field and everything else as invariant fields, and
# the critic pools over the group before its output, so Q is invariant. The CNN baseline is the same schedule with
# plain convolutions; the two sit side by side so a diff of the two shows where the symmetry enters.
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
TARGET_ENTROPY = -5.0  # automatic entropy tuning's target: -dim(action)


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


def sample_action(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterised tanh-squashed Gaussian sample in [-1, 1]^5 and its log-probability."""
    std = log_std.exp()
    pre_tanh = mean + std * torch.randn_like(mean)
    action = torch.tanh(pre_tanh)
    log_prob = torch.distributions.Normal(mean, std).log_prob(pre_tanh) - torch.log(1 - action.pow(2) + 1e-6)
    return action, log_prob.sum(1)


def act(actor: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """The exploration action: a sample of the policy at `obs` (call it under no_grad)."""
    mean, log_std = actor(obs)
    return sample_action(mean, log_std)[0]


def load_actor(path: str, device: torch.device) -> tuple[nn.Module, Args]:  # PLUMBING: --eval-checkpoint
    """The actor saved with --save-model (or in a resume file) and the settings it was trained with (one sentence if
    it does not fit)."""
    checkpoint = load_checkpoint(path, SCRIPT)
    saved = saved_args(checkpoint, Args, path, required=("workspace_size", "dpos", "drot_n", "paper_tasks"))
    actor = EquiActor(saved) if saved.model == "equi" else CNNActor(saved)
    load_state(actor, saved_weights(checkpoint, "actor", path), path)
    return actor.to(device), saved


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


def with_heights(obs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`obs` with `delta` added to its height channel (the holding flag is a fact, not a measurement: unperturbed)."""
    return torch.cat([obs[:, :1] + delta, obs[:, 1:]], dim=1)


def adversarial_smoothness(actor: nn.Module, obs: torch.Tensor, radius: float, steps: int, step_size: float,
                           mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|a(s) - a(s + delta)|^2 on the deterministic action a = tanh(mean), with delta the perturbation of the height
    channel within the L-infinity ball of `radius` that changes a most: CAPS's spatial term at the worst perturbation
    instead of a random one (the smooth policies of SPaCIL). `steps` projected signed-gradient ascent steps (PGD)
    from a uniform random start search for delta; the search trains nothing (a gradient for delta only), the returned
    term trains the actor through both actions, like CAPS's."""
    action = torch.tanh(actor(obs)[0] if mean is None else mean)
    target = action.detach()
    delta = (torch.rand_like(obs[:, :1]) * 2 - 1) * radius
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        change = (torch.tanh(actor(with_heights(obs, delta))[0]) - target).pow(2).sum()
        change.backward(inputs=[delta])  # delta's gradient only: the actor's stay as they are
        delta = (delta.detach() + step_size * delta.grad.sign()).clamp(-radius, radius)
    return (action - torch.tanh(actor(with_heights(obs, delta.detach()))[0])).pow(2).sum(1).mean()


# ---- Constrained SAC: what a step costs, and the budget in the cost critic's units ----------------------------------
COST_SOURCES = {"grip": ("step_peak_grip_force", 20.0), "impact": ("step_peak_impact_force", 20.0),
                "jerk": ("step_mean_squared_jerk", 1e6)}  # --cost-kind: the env's per-step value, default threshold


def step_costs(infos: dict, args: Args) -> np.ndarray:
    """Each env's cost for the step just taken, max(0, x - threshold) / threshold with x the env step's physics value
    of `--cost-kind` (metrics.py's STEP_METRICS): in units of the threshold, so the budget reads the same for a
    force and a jerk. The grip cost is the force penalty's per-step term, here constrained instead of weighted."""
    key, default = COST_SOURCES[args.cost_kind]
    threshold = default if args.cost_threshold is None else args.cost_threshold
    return (np.maximum(0.0, np.asarray(infos[key], dtype=np.float64) - threshold) / threshold).astype(np.float32)


def discounted_budget(args: Args) -> float:
    """The episode budget d in the cost critic's units. Q_c is a discounted sum of per-step costs, the budget an
    undiscounted sum over an episode; spread evenly over a full episode of T = max_steps steps, d costs d / T per
    step, whose discounted sum over the episode is d / T * (1 - gamma^T) / (1 - gamma) (the bound lambda enforces)."""
    horizon = args.max_steps
    return args.cost_limit / horizon * (1 - args.gamma**horizon) / (1 - args.gamma)


# ---- Update steps ---------------------------------------------------------------------------------------------------
# SAC's two losses, each one gradient step in one function (which `--compile` compiles whole). They return detached
# statistics and never read a value back to the host (`.item()`, a data-dependent `if`), so the loop reads numbers
# only when it logs them. alpha is passed as the tensor log_alpha: it changes at every step.
def critic_update_step(actor: nn.Module, critic: nn.Module, critic_target: nn.Module, critic_optimizer, log_alpha,
                       args: Args, data: dict, cost_critic: Optional[nn.Module] = None,
                       cost_critic_target: Optional[nn.Module] = None, cost_critic_optimizer=None
                       ) -> dict[str, torch.Tensor]:
    """One gradient step of the twin soft Q loss, then the Polyak update of the target critic. Returns the losses,
    the Q values of the batch's actions, the TD errors (SACfD's new priorities) and the encoder's features of s,
    which the actor step reuses. Constrained SAC passes its cost critic: the same step fits it too (see below)."""
    alpha = log_alpha.detach().exp()
    with torch.no_grad():  # the soft target, from the target critic; one encoder pass over s feeds both Q heads
        next_mean, next_log_std = actor(data["next_obs"])
        next_actions, next_log_pi = sample_action(next_mean, next_log_std)
        qf1_next, qf2_next = critic_target(data["next_obs"], next_actions)
        min_qf_next = torch.min(qf1_next, qf2_next) - alpha * next_log_pi
        next_q_value = data["rewards"] + (1 - data["terminated"]) * args.gamma * min_qf_next
    features = critic.encode(data["obs"])
    qf1_a_values, qf2_a_values = critic.q_values(features, data["actions"])
    # SACfD's prioritised replay weights each sample by its importance-sampling weight (1 under uniform sampling)
    weights = data["weights"] if args.prioritized_replay else torch.ones_like(qf1_a_values)
    qf1_loss = (weights * (qf1_a_values - next_q_value).pow(2)).mean()
    qf2_loss = (weights * (qf2_a_values - next_q_value).pow(2)).mean()
    qf_loss = qf1_loss + qf2_loss
    critic_optimizer.zero_grad()
    qf_loss.backward()
    critic_optimizer.step()

    # update the target network (here rather than after the actor step: that step does not change the critic)
    with torch.no_grad():
        for param, target_param in zip(critic.parameters(), critic_target.parameters()):
            target_param.lerp_(param, args.tau)
        td_errors = 0.5 * ((qf1_a_values - next_q_value).abs() + (qf2_a_values - next_q_value).abs())
    stats = {"qf1_loss": qf1_loss.detach(), "qf2_loss": qf2_loss.detach(), "qf1_values": qf1_a_values.detach(),
             "qf2_values": qf2_a_values.detach(), "td_errors": td_errors, "features": features.detach()}
    if cost_critic is not None:
        # Constrained SAC: the cost critic learns the discounted cost-to-go of the policy, Q_c(s, a) = c +
        # gamma Q_c(s', a'), from the same next actions and without an entropy term (entropy is no cost). Its twin
        # heads are averaged, not min'd: a min would underestimate costs (optimistic about violations), a max would
        # compound its overestimate through the bootstrapped target.
        with torch.no_grad():
            qc1_next, qc2_next = cost_critic_target(data["next_obs"], next_actions)
            next_qc_value = data["costs"] + (1 - data["terminated"]) * args.gamma * 0.5 * (qc1_next + qc2_next)
        cost_features = cost_critic.encode(data["obs"])
        qc1_a_values, qc2_a_values = cost_critic.q_values(cost_features, data["actions"])
        qc_loss = (weights * (qc1_a_values - next_qc_value).pow(2)).mean() + \
            (weights * (qc2_a_values - next_qc_value).pow(2)).mean()
        cost_critic_optimizer.zero_grad()
        qc_loss.backward()
        cost_critic_optimizer.step()
        with torch.no_grad():
            for param, target_param in zip(cost_critic.parameters(), cost_critic_target.parameters()):
                target_param.lerp_(param, args.tau)
        stats.update(qc_loss=qc_loss.detach() / 2, qc_values=(0.5 * (qc1_a_values + qc2_a_values)).detach(),
                     cost_features=cost_features.detach())
    return stats


def actor_update_step(actor: nn.Module, critic: nn.Module, actor_optimizer, log_alpha, alpha_optimizer, args: Args,
                      data: dict, features: torch.Tensor, cost_critic: Optional[nn.Module] = None,
                      cost_features: Optional[torch.Tensor] = None, lagrange: Optional[torch.Tensor] = None,
                      lagrange_optimizer=None, episode_cost: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """One gradient step of the actor (SAC's loss, SACfD's expert term, the CAPS terms, adversarial smoothness, and
    constrained SAC's lambda Q_c) and, with --autotune, of alpha; constrained SAC then steps lambda. `features` (and
    `cost_features`) are the critics' encodings of s from the critic step (detached: the actor loss must not train
    the critic, and no gradient needs to pass back through the encoder, since it does not see the action); only the
    two small Q heads run again, with the just-updated weights. `episode_cost` is (average, episodes seen) of the
    training episodes' cost, lambda's signal under --lambda-update episodes."""
    alpha = log_alpha.detach().exp()
    mean, log_std = actor(data["obs"])
    pi, log_pi = sample_action(mean, log_std)
    qf1_pi, qf2_pi = critic.q_values(features, pi)
    actor_loss = (alpha * log_pi - torch.min(qf1_pi, qf2_pi)).mean()
    demo_loss = caps_temporal = caps_spatial = alpha_loss = torch.zeros((), device=mean.device)
    smooth_adversarial = qc_pi = lambda_loss = lagrange_now = torch.zeros((), device=mean.device)
    if args.demo_loss_weight > 0:  # SACfD: imitate the planner on demo samples
        # the MSE over the demo samples as a masked mean (0 without any): no data-dependent shape, so a compiled
        # step never stops to wait for the device
        expert = data["expert"].float()[:, None]
        demo_loss = ((pi - data["actions"]).pow(2) * expert).sum() / (expert.sum() * pi.shape[1]).clamp(min=1.0)
        actor_loss = actor_loss + args.demo_loss_weight * demo_loss
    if args.caps_temporal_weight > 0 or args.caps_spatial_weight > 0:
        caps_temporal, caps_spatial = caps_terms(actor, data["obs"], data["next_obs"], args.caps_sigma, mean)
        actor_loss = actor_loss + args.caps_temporal_weight * caps_temporal + args.caps_spatial_weight * caps_spatial
    if args.smooth_adversarial_weight > 0:
        radius, steps = args.smooth_adversarial_radius, args.smooth_adversarial_steps
        step_size = args.smooth_adversarial_step_size or 2.5 * radius / steps
        smooth_adversarial = adversarial_smoothness(actor, data["obs"], radius, steps, step_size, mean)
        actor_loss = actor_loss + args.smooth_adversarial_weight * smooth_adversarial
    if cost_critic is not None:  # constrained SAC: maximise Q_r - lambda Q_c, lambda held fixed in this step
        qc1_pi, qc2_pi = cost_critic.q_values(cost_features, pi)
        qc_pi = 0.5 * (qc1_pi + qc2_pi)
        actor_loss = actor_loss + (lagrange.detach() * qc_pi).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward()
    actor_optimizer.step()

    if args.autotune:
        alpha_loss = (-log_alpha.exp() * (log_pi.detach() + TARGET_ENTROPY)).mean()
        alpha_optimizer.zero_grad()
        alpha_loss.backward()
        alpha_optimizer.step()
    if cost_critic is not None:
        # lambda: gradient ascent on lambda (expected cost - budget), then projected onto lambda >= 0, so it rises
        # while the expected cost exceeds the budget and falls, down to exactly 0, while it is under it. The critic's
        # mean over replayed states dilutes an episode's cost (a short successful episode spends it in a few of its
        # states, a long one that never touches adds many cost-free ones); the measured episodes do not.
        if args.lambda_update == "episodes":  # no step before the first episode has ended
            excess = torch.where(episode_cost[1] > 0, episode_cost[0] - args.cost_limit, 0.0)
        else:
            excess = qc_pi.detach().mean() - discounted_budget(args)
        lambda_loss = (-lagrange * excess).sum()
        lagrange_optimizer.zero_grad()
        lambda_loss.backward()
        lagrange_optimizer.step()
        with torch.no_grad():
            lagrange.clamp_(min=0.0)
        qc_pi, lagrange_now = qc_pi.detach().mean(), lagrange.detach().sum()
    return {"actor_loss": actor_loss.detach(), "demo_loss": demo_loss.detach(), "caps_temporal": caps_temporal.detach(),
            "caps_spatial": caps_spatial.detach(), "alpha_loss": alpha_loss.detach(), "alpha": log_alpha.detach().exp(),
            "smooth_adversarial": smooth_adversarial.detach(), "qc_pi": qc_pi, "lambda_loss": lambda_loss.detach(),
            "lambda": lagrange_now, "entropy": -log_pi.detach().mean(), "policy_std": log_std.detach().exp().mean()}


# ---- Buffer augmentation: the symmetry applied to the data ---------------------------------------------------------
def augment(batch: dict[str, torch.Tensor], aug_copies: int) -> dict[str, torch.Tensor]:
    """The paper's buffer augmentation, sampled lazily: its buffer stores each transition and `aug_copies` copies
    rotated by random angles; here each sampled transition is a rotated copy with probability k / (k + 1), so the
    batch has the same distribution while the buffer holds every real transition once."""
    if aug_copies == 0:
        return batch
    n = batch["actions"].shape[0]
    device = batch["actions"].device
    angles = torch.rand(n, device=device) * 2 * math.pi
    keep = torch.rand(n, device=device) < 1.0 / (aug_copies + 1)
    return rotate_batch(batch, torch.where(keep, torch.zeros_like(angles), angles))


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:  # PLUMBING: evaluate a saved model instead of training
        evaluate_checkpoint(*load_actor(args.eval_checkpoint, device_for(args)), args, device_for(args))
        raise SystemExit(0)
    check_args(args)
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

    # env setup
    constrained = args.cost_limit is not None
    # evaluation measures the physics; training envs only when a constraint's costs read it
    envs = make_envs(args, args.num_envs, args.async_envs, physics_metrics=constrained)

    actor = (EquiActor(args) if args.model == "equi" else CNNActor(args)).to(device)
    critic = (EquiCritic(args) if args.model == "equi" else CNNCritic(args)).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    print(f"{args.model} networks: actor {count_parameters(actor):,} + critic {count_parameters(critic):,} "
          "parameters", flush=True)

    # Automatic entropy tuning (towards TARGET_ENTROPY)
    log_alpha = torch.tensor([math.log(args.alpha)], device=device, requires_grad=args.autotune)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)

    # Constrained SAC: a cost critic of the reward critic's class (invariant, for the equivariant model) with its own
    # target, and the Lagrange multiplier lambda >= 0
    cost_critic = cost_critic_target = cost_critic_optimizer = lagrange = lagrange_optimizer = None
    if constrained:
        cost_critic = (EquiCritic(args) if args.model == "equi" else CNNCritic(args)).to(device)
        cost_critic_target = copy.deepcopy(cost_critic).requires_grad_(False)
        cost_critic_optimizer = torch.optim.Adam(cost_critic.parameters(), lr=args.q_lr)
        lagrange = torch.tensor([args.lambda_init], device=device, requires_grad=True)
        lagrange_optimizer = torch.optim.Adam([lagrange], lr=args.lambda_lr)
    # (average, episodes seen) of the training episodes' cost: lambda's signal under --lambda-update episodes
    episode_cost = torch.zeros(2, device=device) if constrained else None
    measured_cost = dict(episode_cost=episode_cost) if constrained and args.lambda_update == "episodes" else {}
    cost_networks = dict(cost_critic=cost_critic, cost_critic_target=cost_critic_target,
                         cost_critic_optimizer=cost_critic_optimizer)

    if args.prioritized_replay:  # SACfD's buffer: prioritised, its demonstrations never overwritten
        rb = PrioritizedReplayBuffer(args.buffer_size, args.num_envs, args.image_size, args.per_alpha, args.per_eps,
                                     args.per_expert_bonus, costs=constrained)
    else:
        rb = ReplayBuffer(args.buffer_size, args.num_envs, args.image_size, costs=constrained)
    # what a resumed run continues from (its demos are in the saved buffer; the envs start fresh episodes)
    run.keep(actor=actor, critic=critic, critic_target=critic_target, actor_optimizer=actor_optimizer,  # PLUMBING
             critic_optimizer=critic_optimizer, alpha_optimizer=alpha_optimizer, log_alpha=log_alpha, replay_buffer=rb,
             **(dict(cost_networks, lagrange=lagrange, lagrange_optimizer=lagrange_optimizer) if constrained else {}),
             **measured_cost)
    counters = dict(vector_step=0, global_step=0, gradient_steps=0, last_eval=-1)
    counters = run.resume(**counters)  # PLUMBING
    global_step, grad_steps, last_eval = counters["global_step"], counters["gradient_steps"], counters["last_eval"]

    acting_actor, policy, critic_update, actor_update = actor, act, critic_update_step, actor_update_step
    # SPEED: bfloat16 autocast over the updates; torch.compile of the acting and update steps
    critic_update = with_bf16_autocast(critic_update, args, device)  # SPEED
    actor_update = with_bf16_autocast(actor_update, args, device)  # SPEED
    acting_actor = plain_copy(actor) if args.compile else actor  # SPEED: plain-torch copy (dynamo cannot trace escnn)
    policy, critic_update, actor_update = [compiled(f, args) for f in (policy, critic_update, actor_update)]  # SPEED
    if args.compile:  # SPEED: the updates' escnn layers as traceable torch (twins sharing the parameters)
        cost_critics = [cost_critic, cost_critic_target] if constrained else []
        critic_update = through_traced(critic_update, actor, critic, critic_target, *cost_critics)
        actor_update = through_traced(actor_update, actor, critic, critic_target, *cost_critics)

    # Planner demonstrations, through the same envs, before any learning
    obs, _ = envs.reset(seed=args.seed + counters["vector_step"])
    rb.start(obs)
    resetting = np.zeros(args.num_envs, dtype=bool)
    num_demos = args.num_demos
    num_demos = 0 if run.saved is not None else num_demos  # PLUMBING: a resumed run has its demos in its buffer
    recording = np.arange(args.num_envs) < num_demos  # envs whose current episode is one of the demos
    demo_episodes, demo_transitions, started = 0, 0, int(recording.sum())
    while demo_episodes < num_demos:
        actions = np.stack(envs.unwrapped.call("expert_action")).astype(np.float32)
        obs, rewards, terminations, truncations, infos = envs.step(actions)
        costs = step_costs(infos, args) if constrained else 0.0
        rb.add(actions, rewards, terminations, ~resetting & recording, obs, expert=True, costs=costs)
        demo_transitions += int((~resetting & recording).sum())
        for i in np.flatnonzero(np.logical_or(terminations, truncations) & recording):
            demo_episodes += 1
            recording[i] = started < num_demos  # env i records another demo only while some are missing
            started += int(recording[i])
        resetting = np.logical_or(terminations, truncations)
    if demo_episodes:
        obs, _ = envs.reset()
        rb.start(obs)
        resetting[:] = False
        print(f"{demo_episodes} demo episodes: {demo_transitions} transitions in the buffer", flush=True)
        if args.prioritized_replay:  # the paper's SACfD buffer never overwrites its demonstrations
            try:
                rb.protect()
            except ValueError:
                fail(f"the {demo_episodes} demo episodes fill the replay buffer ({args.buffer_size} slots over "
                     f"{args.num_envs} envs); raise --buffer-size or lower --num-demos.")

    # TRY NOT TO MODIFY: start the game
    start_time = time.time()
    update_time, start_grad_steps, last_success = 0.0, grad_steps, float("nan")
    num_vector_steps = args.total_timesteps // args.num_envs
    beta = args.per_beta
    episode_costs = np.zeros(args.num_envs)
    for vector_step in range(counters["vector_step"], num_vector_steps):
        # periodic resume file; on USR1/TERM also stop here (and requeue under SLURM)
        run.checkpoint(vector_step=vector_step, global_step=global_step, gradient_steps=grad_steps,  # PLUMBING
                       last_eval=last_eval)
        global_step += args.num_envs
        # ALGO LOGIC: put action logic here (train mode, no_grad: escnn builds fresh filters from current weights)
        with torch.no_grad():
            refresh(acting_actor, actor)  # SPEED: the plain copy takes the updated weights
            actions = policy(acting_actor, obs_to_tensor(obs, device)).cpu().numpy()

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        costs = step_costs(infos, args) if constrained else 0.0  # 0 in a reset step: its info is the reset's
        episode_costs += costs
        if "_episode" in infos:
            for i in np.flatnonzero(infos["_episode"]):
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)
                writer.add_scalar("charts/episodic_success", float(infos["is_success"][i]), global_step)
                if constrained:  # the budget is on this sum; the violations' running mean is the violation rate
                    writer.add_scalar("charts/episodic_cost", episode_costs[i], global_step)
                    writer.add_scalar("charts/cost_budget_violation", float(episode_costs[i] > args.cost_limit),
                                      global_step)
                    seen = min(episode_cost[1].item() + 1, args.lambda_cost_window)
                    episode_cost[0] += (episode_costs[i] - episode_cost[0]) / seen
                    episode_cost[1] = seen
                episode_costs[i] = 0.0
        rb.add(actions, rewards, terminations, ~resetting, next_obs, costs=costs)
        resetting = np.logical_or(terminations, truncations)
        obs = next_obs

        # ALGO LOGIC: training.
        if len(rb) < args.learning_starts:
            continue
        update_start = time.time()
        for _ in range(args.updates_per_step):
            if args.prioritized_replay:  # SACfD: importance-sampling exponent annealed to 1 over the run
                beta = annealed_beta(args.per_beta, grad_steps + 1, num_vector_steps * args.updates_per_step)
                data = augment(rb.sample(args.batch_size, device, beta), args.aug_copies)
            else:
                data = augment(rb.sample(args.batch_size, device), args.aug_copies)
            data = channels_last(data)  # SPEED
            indices = data.pop("indices", None)  # NumPy, for the priorities: not an input of the update steps
            grad_steps += 1
            critic_stats = critic_update(actor, critic, critic_target, critic_optimizer, log_alpha, args, data,
                                         **cost_networks)
            if args.prioritized_replay:
                rb.update_priorities(indices, critic_stats["td_errors"].cpu().numpy())
            actor_stats = actor_update(actor, critic, actor_optimizer, log_alpha, alpha_optimizer, args, data,
                                       critic_stats["features"], cost_critic, critic_stats.get("cost_features"),
                                       lagrange, lagrange_optimizer, episode_cost)
        update_time += time.time() - update_start
        updates_per_second = (grad_steps - start_grad_steps) / max(update_time, 1e-9)

        if grad_steps % args.log_frequency < args.updates_per_step:
            qf1_loss, qf2_loss = critic_stats["qf1_loss"].item(), critic_stats["qf2_loss"].item()
            writer.add_scalar("losses/qf1_values", critic_stats["qf1_values"].mean().item(), global_step)
            writer.add_scalar("losses/qf2_values", critic_stats["qf2_values"].mean().item(), global_step)
            writer.add_scalar("losses/qf1_loss", qf1_loss, global_step)
            writer.add_scalar("losses/qf2_loss", qf2_loss, global_step)
            writer.add_scalar("losses/qf_loss", (qf1_loss + qf2_loss) / 2.0, global_step)
            for key in ("actor_loss", "demo_loss", "caps_temporal", "caps_spatial", "smooth_adversarial", "alpha",
                        "entropy", "policy_std"):
                writer.add_scalar(f"losses/{key}", actor_stats[key].item(), global_step)
            if constrained:
                writer.add_scalar("charts/lambda", actor_stats["lambda"].item(), global_step)
                if args.lambda_update == "episodes":
                    writer.add_scalar("charts/episodic_cost_average", episode_cost[0].item(), global_step)
                writer.add_scalar("losses/lambda_loss", actor_stats["lambda_loss"].item(), global_step)
                writer.add_scalar("losses/qc_loss", critic_stats["qc_loss"].item(), global_step)
                writer.add_scalar("losses/qc_values", critic_stats["qc_values"].mean().item(), global_step)
                writer.add_scalar("losses/qc_pi", actor_stats["qc_pi"].item(), global_step)
                writer.add_scalar("charts/cost_budget_q", discounted_budget(args), global_step)
            if args.autotune:
                writer.add_scalar("losses/alpha_loss", actor_stats["alpha_loss"].item(), global_step)
            sps = int(global_step / (time.time() - start_time))
            sps = int(run.sps(global_step))  # PLUMBING: the steps of this process (a resumed run counts anew)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/updates_per_second", updates_per_second, global_step)
            writer.add_scalar("charts/gradient_steps", grad_steps, global_step)
            if args.prioritized_replay:
                writer.add_scalar("charts/per_beta", beta, global_step)
                writer.add_scalar("losses/is_weight_mean", data["weights"].mean().item(), global_step)
                writer.add_scalar("losses/td_error_mean", critic_stats["td_errors"].mean().item(), global_step)
                writer.add_scalar("charts/per_expert_fraction", data["expert"].float().mean().item(), global_step)

        final = vector_step == num_vector_steps - 1
        if (grad_steps % args.eval_frequency < args.updates_per_step or final) and last_eval != grad_steps:
            last_eval = grad_steps
            result = evaluate(actor, args, device, seed=args.seed + 10_000 + grad_steps)
            for key, value in result.items():
                writer.add_scalar(f"eval/{key}", value, global_step)
            writer.add_scalar("eval/gradient_steps", grad_steps, global_step)
            last_success = result["success_rate"]
            print(f"eval @ {grad_steps} gradient steps: "
                  f"{format_eval(result, args.eval_episodes, args.seed + 10_000 + grad_steps)}", flush=True)
        run.progress(global_step, num_vector_steps * args.num_envs, f"{grad_steps} gradient steps",  # PLUMBING
                     f"updates/s {updates_per_second:.2f}", f"last eval success {last_success:.2f}", force=final)

    envs.close()
    if args.save_model:  # PLUMBING: the model file, with the script's name and settings
        run.save_model(actor=actor.state_dict(), critic=critic.state_dict(), critic_target=critic_target.state_dict(),
                       log_alpha=log_alpha.detach().cpu(), global_step=global_step, gradient_steps=grad_steps)
    if args.save_model or args.capture_video:  # the final policy, greedy, on the evaluation scenes (and on video)
        result = evaluate(actor, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run_name}-eval" if args.capture_video else None)
        print(f"final eval: {format_eval(result, args.eval_episodes, args.seed + 10_000)}", flush=True)
    run.finish(vector_step=max(counters["vector_step"], num_vector_steps), global_step=global_step,  # PLUMBING
               gradient_steps=grad_steps, last_eval=last_eval)
    writer.close()
