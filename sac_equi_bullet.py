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
cleanrl_equi/envs/manipulation/metrics.py defines each).

    uv run python sac_equi_bullet.py --env-id cleanrl_equi/BlockPulling-v0 --total-timesteps 100000
    uv run python sac_equi_bullet.py --model cnn                         # the plain baseline
    uv run python sac_equi_bullet.py --demo-loss-weight 1                # SACfD
    uv run python sac_equi_bullet.py --env-id cleanrl_equi/BlockStacking-v0 --demo-loss-weight 1 --prioritized-replay
    uv run python sac_equi_bullet.py --eval-checkpoint runs/<run>/sac_equi_bullet.cleanrl_model
"""

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from cleanrl_equi.compile import check_compile_flags, compiled, plain_copy, refresh
from cleanrl_equi.datasets import stored_obs_to_tensor
from cleanrl_equi.envs.manipulation import (check_env_id, evaluate, evaluate_checkpoint, format_eval, make_envs,
                                            obs_to_tensor, rotate_batch)
from cleanrl_equi.equivariant import EscnnModule, TensorToField, count_parameters, enn, gspaces, planar_action_type
from cleanrl_equi.checkpoints import load_checkpoint, load_state
from cleanrl_equi.errors import fail, require
from cleanrl_equi.run import Run, device_for

SCRIPT = os.path.basename(__file__)[: -len(".py")]


@dataclass
class Args:
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
    eval_checkpoint: Optional[str] = None
    """evaluate this saved model (a `.cleanrl_model` file) for `eval_episodes` episodes instead of training"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it
    holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0
    """write the resume file runs/{run_name}/resume.pt (networks, optimisers, RNG and the replay buffer) every this
    many minutes (0 = only on a USR1/TERM signal)"""

    # Environment
    env_id: str = "cleanrl_equi/BlockPulling-v0"
    """the id of a manipulation task, `cleanrl_equi/<Task>-v0`"""
    image_size: int = 128
    """observation height and width in pixels: 16, 32, 64, 128 (paper) or 256; the image spans 1.5 x the workspace"""
    workspace_size: float = 0.4
    """side of the square workspace in metres (the paper's 0.4, seen as 0.6 m; BulletArm's default 0.3)"""
    dpos: float = 0.05
    """metres the gripper moves per unit of dx, dy, dz (the paper's 0.05)"""
    drot_n: int = 8
    """one unit of dtheta turns the gripper by pi / drot_n radians (the paper's 8; BulletArm's default 4)"""
    max_steps: int = 100
    """episode length limit (the paper's 100; BulletArm's 50)"""
    paper_tasks: bool = True
    """the paper's task sizes and success thresholds where BulletArm's differ: Block Pulling blocks 10 x 10 x 5 cm
    of 0.5 kg, Block Picking and Corner Picking lifted above 0.08 m, a 5 cm cube in Corner Picking"""
    num_envs: int = 5
    """the number of parallel training environments (the paper's 5)"""
    async_envs: bool = False
    """run each environment in its own process (gymnasium's AsyncVectorEnv); worth it with spare CPU cores"""

    # Networks
    model: str = "equi"
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

    # Smooth, gentle motion: CAPS in the actor loss; compliance and reward shaping in the env (all off by default)
    caps_temporal_weight: float = 0.0
    """CAPS temporal term: weight of |mu(s_t) - mu(s_t+1)|^2 in the actor loss (0 = off)"""
    caps_spatial_weight: float = 0.0
    """CAPS spatial term: weight of |mu(s) - mu(s + noise)|^2 in the actor loss (0 = off)"""
    caps_sigma: float = 0.01
    """std of the Gaussian noise on the height channel (in [0, 1] image units; 0.01 = 2.55 mm) for the spatial term"""
    action_rate_penalty: float = 0.0
    """env reward shaping: minus this times |a_t - a_t-1|^2 (normalised actions) at every step (0 = off)"""
    force_penalty: float = 0.0
    """env reward shaping: minus this times (peak gripper contact force in the step - threshold) / threshold (0 = off)"""
    force_threshold: float = 20.0
    """newtons of gripper contact force the force penalty tolerates"""
    gripper_force: float = 150.0
    """compliance: the most force (N) the gripper's positioning constraint applies; lower yields on contact"""
    finger_force: float = 25.0
    """compliance: the most force (N) each finger squeezes with"""

    # Evaluation and logging
    eval_frequency: int = 500
    """evaluate every this many gradient steps (and at the end)"""
    eval_episodes: int = 100
    """episodes per evaluation, with the deterministic action tanh(mean)"""
    num_eval_envs: int = 5
    """parallel environments used by evaluation"""
    log_frequency: int = 100
    """write the loss scalars every this many gradient steps"""
    progress_interval: float = 30.0
    """seconds between progress lines on stdout"""
    compile: bool = False
    """torch.compile the acting step and the update steps (critic; actor, alpha and CAPS; target update): the same
    algorithm. escnn layers cannot be traced (they run eagerly between the compiled parts of the update); the
    equivariant actor acts through a plain-torch copy"""
    cudagraphs: bool = False
    """like --compile, and replay each step as a recorded CUDA graph (torch.compile "reduce-overhead" mode; GPU only)"""
    bf16: bool = False
    """run the networks' forward passes in the updates in bfloat16 mixed precision (torch.autocast; weights,
    optimizer state, log-probabilities, Q values and losses stay float32); CPUs with AVX512-BF16/AMX and recent GPUs"""


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence, on settings that cannot work."""
    check_env_id(args.env_id)
    if args.model not in ("equi", "cnn"):
        fail(f"--model must be 'equi' or 'cnn', not {args.model!r}.")
    if args.image_size not in (16, 32, 64, 128, 256, 512, 1024):
        fail(f"--image-size must be a power of two from 16 to 1024 (the encoder halves it down to 8 x 8 pixels), "
             f"not {args.image_size}.")
    if args.group_order < 2 or (args.group_order != 2 and args.group_order % 4 != 0):
        fail(f"--group-order {args.group_order} does not contain the 90-degree turns of the pixel grid; "
             "use 4, 8, 12, 16 (or 2).")
    if args.n_hidden < 8 or args.n_hidden % 8 != 0:
        fail(f"--n-hidden {args.n_hidden} must be a multiple of 8 (the first layer has n/8 fields).")
    if not 0.25 <= args.workspace_size <= 0.6:
        fail(f"--workspace-size must be in [0.25, 0.6] metres (the tasks' objects need room), "
             f"not {args.workspace_size}.")
    if not 0.005 <= args.dpos <= 0.1:
        fail(f"--dpos must be in [0.005, 0.1] metres per step, not {args.dpos}.")
    if not 2 <= args.drot_n <= 314:
        fail(f"--drot-n must be from 2 to 314 (a dtheta step of pi / drot_n radians), not {args.drot_n}.")
    require(args, positive=("policy_lr", "q_lr", "alpha", "caps_sigma", "per_eps"),
            fractions=("gamma", "tau", "per_alpha", "per_beta"),
            non_negative=("num_demos", "aug_copies", "total_timesteps", "learning_starts", "demo_loss_weight",
                          "caps_temporal_weight", "caps_spatial_weight", "per_expert_bonus", "action_rate_penalty",
                          "force_penalty"),
            at_least_one=("num_envs", "num_eval_envs", "batch_size", "eval_frequency", "eval_episodes",
                          "log_frequency", "updates_per_step", "max_steps"))
    if args.buffer_size < max(args.batch_size, args.learning_starts, 2 * args.num_envs):
        fail(f"--buffer-size {args.buffer_size} is smaller than a batch or --learning-starts; raise it.")
    if args.learning_starts < args.batch_size:
        fail(f"--learning-starts {args.learning_starts} is less than --batch-size {args.batch_size}: the first batch "
             "would be larger than the data; raise --learning-starts.")
    if not (0.1 <= args.force_threshold <= 1000 and 1 <= args.gripper_force <= 1000 and 1 <= args.finger_force <= 200):
        fail(f"--force-threshold must be in [0.1, 1000] N, --gripper-force in [1, 1000] N and --finger-force in "
             f"[1, 200] N, not {args.force_threshold}, {args.gripper_force} and {args.finger_force}.")
    if args.demo_loss_weight > 0 and args.num_demos == 0:
        fail("--demo-loss-weight needs demonstrations; set --num-demos to at least 1 (or the weight to 0).")
    check_compile_flags(args, device_for(args))


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
    """2 x S x S image (height, holding flag: both invariant fields) -> n regular fields of C_N at 1 x 1."""

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 under --bf16 too: the log-probabilities and the losses are computed from these
        out = self.head(self.encoder(x)).tensor.flatten(1).float()  # (dx, dy, p, dz, dtheta, log-std x 5)
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

    def forward(self, x, action):
        return self.q_values(self.encode(x), action)


def cnn_width_scale(group_order: int) -> float:
    """A pair of C_N regular fields linked by a 3x3 kernel has about 6N free parameters, a pair of plain channels 9:
    sqrt(2N/3) x as many channels as regular fields matches the parameter counts within a few percent."""
    return math.sqrt(2 * group_order / 3)


class CNNEncoder(nn.Module):
    """The equivariant encoder's layer schedule with plain convolutions, `cnn_width_scale` x as wide."""

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
        out = self.head(self.encoder(x)).float()  # float32 under --bf16 too
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
        return self.q1(joint).flatten().float(), self.q2(joint).flatten().float()  # float32 under --bf16 too

    def forward(self, x, action):
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


# What a model saved before the env settings were flags was trained with (the envs' BulletArm-style defaults), so
# evaluating it rebuilds its own envs rather than today's defaults.
SETTINGS_BEFORE_FLAGS = {"workspace_size": 0.3, "dpos": 0.05, "drot_n": 4, "paper_tasks": False}


def load_actor(path: str, device: torch.device) -> tuple[nn.Module, Args]:
    """The actor saved with --save-model and the settings it was trained with (one sentence if it does not fit)."""
    checkpoint = load_checkpoint(path, SCRIPT)
    trained = {**SETTINGS_BEFORE_FLAGS, **checkpoint["args"]}
    saved = Args(**{k: v for k, v in trained.items() if k in Args.__dataclass_fields__})
    actor = EquiActor(saved) if saved.model == "equi" else CNNActor(saved)
    load_state(actor, checkpoint["actor"], path)
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


# ---- Update steps ---------------------------------------------------------------------------------------------------
# Each is one function so that `--compile` compiles all of it (loss, backward, optimizer step); they return detached
# tensors and never read a value back to the host (`.item()`, a data-dependent `if`), so a compiled step runs
# without waiting for the device, and the loop reads the numbers only when it logs them. alpha is passed as
# log_alpha, a tensor: a Python float that changes at every step would be a constant of the compiled code.
def critic_update_step(actor: nn.Module, critic: nn.Module, critic_target: nn.Module, critic_optimizer, log_alpha,
                       args: Args, data: dict):
    """One gradient step of the twin soft Q loss (importance-weighted under prioritised replay), then the Polyak
    update of the target critic. Returns the two losses, the Q values of the batch's actions, the TD errors (the new
    priorities) and the encoder's features of s (detached), which the actor step reuses."""
    alpha = log_alpha.detach().exp()
    with torch.autocast(data["obs"].device.type, torch.bfloat16, enabled=args.bf16):  # the forward passes only
        # The target uses the target critic, no grad; one encoder pass over s feeds both Q heads.
        with torch.no_grad():
            next_mean, next_log_std = actor(data["next_obs"])
            next_actions, next_log_pi = sample_action(next_mean, next_log_std)
            qf1_next, qf2_next = critic_target(data["next_obs"], next_actions)
            min_qf_next = torch.min(qf1_next, qf2_next) - alpha * next_log_pi
            next_q_value = data["rewards"] + (1 - data["terminated"]) * args.gamma * min_qf_next
        features = critic.encode(data["obs"])
        qf1_a_values, qf2_a_values = critic.q_values(features, data["actions"])
    if args.prioritized_replay:  # the importance-sampling weights, applied (the paper's code left them out)
        qf1_loss = (data["weights"] * (qf1_a_values - next_q_value).pow(2)).mean()
        qf2_loss = (data["weights"] * (qf2_a_values - next_q_value).pow(2)).mean()
    else:
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
    qf_loss = qf1_loss + qf2_loss
    critic_optimizer.zero_grad()
    qf_loss.backward()
    critic_optimizer.step()
    with torch.no_grad():
        td_errors = 0.5 * ((qf1_a_values - next_q_value).abs() + (qf2_a_values - next_q_value).abs())

    # update the target network (here rather than after the actor step: that step does not change the critic)
    with torch.no_grad():
        for param, target_param in zip(critic.parameters(), critic_target.parameters()):
            target_param.lerp_(param, args.tau)
    return (qf1_loss.detach(), qf2_loss.detach(), qf1_a_values.detach(), qf2_a_values.detach(), td_errors,
            features.detach())


def actor_update_step(actor: nn.Module, critic: nn.Module, actor_optimizer, log_alpha, alpha_optimizer, args: Args,
                      data: dict, features: torch.Tensor):
    """One gradient step of the actor (SAC's loss, SACfD's expert term, the CAPS terms) and, with --autotune, of
    alpha. `features` is the critic's encoding of s from the critic step (detached: the actor loss must not train
    the critic, and no gradient needs to pass back through the encoder, since it does not see the action); only the
    two small Q heads run again, with the just-updated weights. Returns the actor loss, its demo and CAPS terms, the
    alpha loss and the new alpha."""
    alpha = log_alpha.detach().exp()
    with torch.autocast(data["obs"].device.type, torch.bfloat16, enabled=args.bf16):  # the forward passes only
        mean, log_std = actor(data["obs"])
        pi, log_pi = sample_action(mean, log_std)
        qf1_pi, qf2_pi = critic.q_values(features, pi)
        actor_loss = (alpha * log_pi - torch.min(qf1_pi, qf2_pi)).mean()
        demo_loss = caps_temporal = caps_spatial = alpha_loss = torch.zeros((), device=mean.device)
        if args.demo_loss_weight > 0:  # SACfD: imitate the planner on demo samples
            # the MSE over the demo samples as a masked mean (0 without any): the same loss as indexing pi[expert],
            # with no data-dependent shape or branch, which would make the compiled step stop and wait for the device
            expert = data["expert"].float()[:, None]
            demo_loss = ((pi - data["actions"]).pow(2) * expert).sum() / (expert.sum() * pi.shape[1]).clamp(min=1.0)
            actor_loss = actor_loss + args.demo_loss_weight * demo_loss
        if args.caps_temporal_weight > 0 or args.caps_spatial_weight > 0:
            caps_temporal, caps_spatial = caps_terms(actor, data["obs"], data["next_obs"], args.caps_sigma, mean)
            caps_loss = args.caps_temporal_weight * caps_temporal + args.caps_spatial_weight * caps_spatial
            actor_loss = actor_loss + caps_loss
    actor_optimizer.zero_grad()
    actor_loss.backward()
    actor_optimizer.step()

    if args.autotune:
        alpha_loss = (-log_alpha.exp() * (log_pi.detach() + TARGET_ENTROPY)).mean()
        alpha_optimizer.zero_grad()
        alpha_loss.backward()
        alpha_optimizer.step()
    return (actor_loss.detach(), demo_loss.detach(), caps_temporal.detach(), caps_spatial.detach(),
            alpha_loss.detach(), log_alpha.detach().exp())


# ---- Replay buffer and augmentation ---------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions of `num_envs` parallel streams, each observation stored once.

    Row i holds, for every env, the observation s_i (height channel as uint8, holding flag as one bool) and the
    transition (a_i, r_i, terminated_i) that left it; s_{i+1} is the next row's observation. The step in which a
    vector env resets an env after an episode end (gymnasium's next-step autoreset) is stored as an invalid row,
    so no transition ever joins two episodes. 100k transitions of 128x128 images take 1.6 GB (16 KiB each).
    Rows 0 .. keep - 1 are never overwritten (`protect`): a full buffer wraps to row `keep`, not to row 0.
    """

    scalars = ("pos", "filled", "keep")  # the state besides the arrays

    def __init__(self, capacity: int, num_envs: int, image_size: int):
        self.rows, self.num_envs, self.pos, self.filled, self.keep = capacity // num_envs, num_envs, 0, 1, 0
        self.heights = np.zeros((self.rows, num_envs, image_size, image_size), dtype=np.uint8)
        self.holding = np.zeros((self.rows, num_envs), dtype=bool)
        self.actions = np.zeros((self.rows, num_envs, 5), dtype=np.float32)
        self.rewards = np.zeros((self.rows, num_envs), dtype=np.float32)
        self.terminated = np.zeros((self.rows, num_envs), dtype=bool)
        self.expert = np.zeros((self.rows, num_envs), dtype=bool)
        self.valid = np.zeros((self.rows, num_envs), dtype=bool)

    def _put_observation(self, obs: np.ndarray):
        self.heights[self.pos], self.holding[self.pos] = obs[:, 0], obs[:, 1, 0, 0] > 0
        self.valid[self.pos] = False  # the old transition of this row just lost its observation

    def start(self, obs: np.ndarray):
        """The first observations after a reset of all envs (an invalid row closes any unfinished stream)."""
        if self.valid.any() or self.pos > 0:
            self.add(np.zeros((self.num_envs, 5), np.float32), np.zeros(self.num_envs), np.zeros(self.num_envs, bool),
                     np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool), obs)
        else:
            self._put_observation(obs)

    def add(self, actions, rewards, terminated, valid, expert, next_obs):
        p = self.pos
        self.actions[p], self.rewards[p], self.terminated[p] = actions, rewards, terminated
        self.valid[p], self.expert[p] = valid, expert
        self.pos = p + 1 if p + 1 < self.rows else self.keep
        self.filled = max(self.filled, self.pos + 1)  # rows 0 .. filled - 1 hold data (all of them once it wraps)
        self._put_observation(next_obs)

    def protect(self) -> None:
        """Keep every row written so far (the demonstrations) for good. Call it right after `start`, whose invalid
        row ends the kept rows, so no kept transition leads into the first row the ring overwrites."""
        if self.pos + 1 != self.filled or self.pos > self.rows - 2:
            raise ValueError("the rows to keep fill the replay buffer")
        if self.pos > 0 and self.valid[self.pos - 1].any():
            raise ValueError("protect() must follow start(): the last kept row leads into the row the ring overwrites")
        self.keep = self.pos

    def _next_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows + 1 < self.rows, rows + 1, self.keep)

    def __len__(self) -> int:
        return int(self.valid.sum())

    def state_dict(self) -> dict:
        """The filled rows only, as tensors sharing the buffer's memory (torch writes them as raw bytes, without a
        copy): a resume file early in a run is small, and a full 100k-transition 128 px buffer is 1.6 GB."""
        arrays = {k: torch.from_numpy(v[: self.filled]) for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return {**{k: getattr(self, k) for k in self.scalars}, **arrays}

    def load_state_dict(self, state: dict) -> None:
        for key, array in vars(self).items():
            if isinstance(array, np.ndarray):
                if state[key].shape[1:] != array.shape[1:] or len(state[key]) > len(array):
                    raise ValueError(f"replay buffer {key} has shape {state[key].shape}, not {array.shape}")
                array[: len(state[key])] = np.asarray(state[key])
                array[len(state[key]):] = 0
        for key in self.scalars:
            setattr(self, key, state[key])

    def sample(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        return self._batch(np.random.choice(np.flatnonzero(self.valid.ravel()), batch_size), device)

    def _batch(self, flat: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """The transitions at flat indices row * num_envs + env."""
        rows, envs = np.divmod(flat, self.num_envs)
        next_rows = self._next_rows(rows)

        as_tensor = lambda a: torch.as_tensor(a[rows, envs], device=device)  # noqa: E731
        return {"obs": stored_obs_to_tensor(self.heights[rows, envs], self.holding[rows, envs], device),
                "next_obs": stored_obs_to_tensor(self.heights[next_rows, envs], self.holding[next_rows, envs], device),
                "actions": as_tensor(self.actions),
                "rewards": as_tensor(self.rewards), "terminated": as_tensor(self.terminated).float(),
                "expert": as_tensor(self.expert)}


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritised replay (Schaul et al. 2016, arXiv 1511.05952) as the paper's SACfD used it.

    Transition i is drawn with probability P(i) = p_i^alpha / sum_j p_j^alpha, one draw from each of `batch_size`
    equal slices of the total (stratified, as the paper's buffer). p_i = |TD error| + eps + `expert_bonus` for a
    demonstration, so the few demonstrations stay in the batches; a new transition enters with the largest p so
    far, so it is seen soon. Each sample comes with its importance-sampling weight (N P(i))^-beta divided by the
    largest such weight in the buffer (that of the smallest priority), so weights lie in (0, 1].

    `priorities` holds p^alpha per stored transition and 0 where there is none (invalid rows), so it is part of the
    saved state like every other array. Sampling is a cumulative sum over the filled rows and a binary search per
    draw: O(N) per batch, like the uniform buffer's scan of its valid flags.
    """

    scalars = (*ReplayBuffer.scalars, "max_priority")

    def __init__(self, capacity: int, num_envs: int, image_size: int, alpha: float = 0.6, eps: float = 1e-6,
                 expert_bonus: float = 1.0):
        super().__init__(capacity, num_envs, image_size)
        self.alpha, self.eps, self.expert_bonus = alpha, eps, expert_bonus
        self.priorities = np.zeros((self.rows, num_envs))
        self.max_priority = 1.0

    def _put_observation(self, obs: np.ndarray):
        super()._put_observation(obs)
        self.priorities[self.pos] = 0.0

    def add(self, actions, rewards, terminated, valid, expert, next_obs):
        row = self.pos
        super().add(actions, rewards, terminated, valid, expert, next_obs)
        self.priorities[row] = np.where(valid, self.max_priority**self.alpha, 0.0)

    def sample(self, batch_size: int, device: torch.device, beta: float = 1.0) -> dict:
        """A batch as `ReplayBuffer.sample` gives it, plus `weights` (the importance-sampling weights, on `device`)
        and `indices` (NumPy flat indices, for `update_priorities`)."""
        mass = self.priorities[: self.filled].ravel()
        cumulative = np.cumsum(mass)
        total = cumulative[-1]
        targets = (np.arange(batch_size) + np.random.random_sample(batch_size)) * (total / batch_size)
        flat = np.searchsorted(cumulative, np.minimum(targets, np.nextafter(total, 0.0)), side="right")
        smallest = np.min(mass, where=mass > 0, initial=np.inf)
        batch = self._batch(flat, device)
        batch["weights"] = torch.as_tensor((mass[flat] / smallest) ** -beta, dtype=torch.float32, device=device)
        batch["indices"] = flat
        return batch

    def update_priorities(self, flat: np.ndarray, td_errors: np.ndarray) -> None:
        rows, envs = np.divmod(flat, self.num_envs)
        priority = np.abs(td_errors) + self.eps + self.expert_bonus * self.expert[rows, envs]
        self.max_priority = max(self.max_priority, float(priority.max()))
        self.priorities[rows, envs] = np.where(self.valid[rows, envs], priority**self.alpha, 0.0)


def annealed_beta(start: float, step: int, total_steps: int) -> float:
    """The importance-sampling exponent at gradient step `step` (from 1) of `total_steps`: linear from `start`, 1
    at the last step and after, as the paper anneals it over its training steps."""
    return start + (1.0 - start) * min(1.0, step / max(total_steps, 1))


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
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(*load_actor(args.eval_checkpoint, device_for(args)), args, device_for(args))
        raise SystemExit(0)
    check_args(args)
    run = Run(SCRIPT, args, args.env_id.replace("/", "_"))  # PLUMBING: run dir, TensorBoard, resume file, signals
    writer, device = run.writer, run.device

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # env setup
    envs = make_envs(args, args.num_envs, args.async_envs, physics_metrics=False)  # evaluation measures them

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

    if args.prioritized_replay:
        rb = PrioritizedReplayBuffer(args.buffer_size, args.num_envs, args.image_size, args.per_alpha, args.per_eps,
                                     args.per_expert_bonus)
    else:
        rb = ReplayBuffer(args.buffer_size, args.num_envs, args.image_size)
    # PLUMBING: what a resumed run continues from (the demos are in the saved buffer; envs start fresh episodes)
    run.keep(actor=actor, critic=critic, critic_target=critic_target, actor_optimizer=actor_optimizer,
             critic_optimizer=critic_optimizer, alpha_optimizer=alpha_optimizer, log_alpha=log_alpha, replay_buffer=rb)
    counters = run.resume(vector_step=0, global_step=0, gradient_steps=0, last_eval=-1)
    global_step, grad_steps, last_eval = counters["global_step"], counters["gradient_steps"], counters["last_eval"]

    # PLUMBING: --compile/--cudagraphs, the same acting and update steps through torch.compile (README "Speed");
    # dynamo cannot trace escnn's layers, so the equivariant actor acts through a plain-torch copy (export)
    acting_actor = plain_copy(actor) if args.compile else actor
    policy = compiled(act, args)
    critic_update = compiled(critic_update_step, args)
    actor_update = compiled(actor_update_step, args)

    # Planner demonstrations, through the same envs, before any learning
    obs, _ = envs.reset(seed=args.seed + counters["vector_step"])
    rb.start(obs)
    resetting = np.zeros(args.num_envs, dtype=bool)
    recording = np.arange(args.num_envs) < args.num_demos  # envs whose current episode is one of the demos
    demo_episodes, demo_transitions, started = 0, 0, int(recording.sum())
    while demo_episodes < args.num_demos and run.saved is None:
        actions = np.stack(envs.unwrapped.call("expert_action")).astype(np.float32)
        obs, rewards, terminations, truncations, infos = envs.step(actions)
        rb.add(actions, rewards, terminations, ~resetting & recording, np.ones(args.num_envs, bool), obs)
        demo_transitions += int((~resetting & recording).sum())
        for i in np.flatnonzero(np.logical_or(terminations, truncations) & recording):
            demo_episodes += 1
            recording[i] = started < args.num_demos  # env i records another demo only while some are missing
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
    update_time, start_grad_steps, last_success = 0.0, grad_steps, float("nan")
    num_vector_steps = args.total_timesteps // args.num_envs
    beta = args.per_beta
    for vector_step in range(counters["vector_step"], num_vector_steps):
        # PLUMBING: periodic resume file; on USR1/TERM also stop here (and requeue under SLURM)
        run.checkpoint(vector_step=vector_step, global_step=global_step, gradient_steps=grad_steps, last_eval=last_eval)
        global_step += args.num_envs
        # ALGO LOGIC: put action logic here (train mode, no_grad: escnn builds fresh filters from current weights)
        with torch.no_grad():
            if args.compile:
                refresh(acting_actor, actor)  # PLUMBING: the plain copy takes the updated weights
            actions = policy(acting_actor, obs_to_tensor(obs, device)).cpu().numpy()

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        if "_episode" in infos:
            for i in np.flatnonzero(infos["_episode"]):
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)
                writer.add_scalar("charts/episodic_success", float(infos["is_success"][i]), global_step)
        rb.add(actions, rewards, terminations, ~resetting, np.zeros(args.num_envs, bool), next_obs)
        resetting = np.logical_or(terminations, truncations)
        obs = next_obs

        # ALGO LOGIC: training.
        if len(rb) < args.learning_starts:
            continue
        update_start = time.time()
        for _ in range(args.updates_per_step):
            if args.prioritized_replay:
                beta = annealed_beta(args.per_beta, grad_steps + 1, num_vector_steps * args.updates_per_step)
                data = augment(rb.sample(args.batch_size, device, beta), args.aug_copies)
            else:
                data = augment(rb.sample(args.batch_size, device), args.aug_copies)
            for key in ("obs", "next_obs"):  # channels-last images: 15-30% faster convolutions (measured on CPU)
                data[key] = data[key].contiguous(memory_format=torch.channels_last)
            indices = data.pop("indices", None)  # NumPy, for the priorities: not an input of the update steps
            grad_steps += 1
            qf1_loss, qf2_loss, qf1_a_values, qf2_a_values, td_errors, features = critic_update(
                actor, critic, critic_target, critic_optimizer, log_alpha, args, data)
            if args.prioritized_replay:
                rb.update_priorities(indices, td_errors.cpu().numpy())
            actor_loss, demo_loss, caps_temporal, caps_spatial, alpha_loss, alpha = actor_update(
                actor, critic, actor_optimizer, log_alpha, alpha_optimizer, args, data, features)
        update_time += time.time() - update_start
        updates_per_second = (grad_steps - start_grad_steps) / max(update_time, 1e-9)

        if grad_steps % args.log_frequency < args.updates_per_step:
            writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
            writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
            writer.add_scalar("losses/qf_loss", (qf1_loss + qf2_loss).item() / 2.0, global_step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
            writer.add_scalar("losses/demo_loss", demo_loss.item(), global_step)
            writer.add_scalar("losses/caps_temporal", caps_temporal.item(), global_step)
            writer.add_scalar("losses/caps_spatial", caps_spatial.item(), global_step)
            writer.add_scalar("losses/alpha", alpha.item(), global_step)
            if args.autotune:
                writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
            writer.add_scalar("charts/SPS", int(run.sps(global_step)), global_step)
            writer.add_scalar("charts/updates_per_second", updates_per_second, global_step)
            writer.add_scalar("charts/gradient_steps", grad_steps, global_step)
            if args.prioritized_replay:
                writer.add_scalar("charts/per_beta", beta, global_step)
                writer.add_scalar("losses/is_weight_mean", data["weights"].mean().item(), global_step)
                writer.add_scalar("losses/td_error_mean", td_errors.mean().item(), global_step)
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
    if args.save_model:
        run.save_model(actor=actor.state_dict(), critic=critic.state_dict(), critic_target=critic_target.state_dict(),
                       log_alpha=log_alpha.detach().cpu(), global_step=global_step, gradient_steps=grad_steps)
    if args.save_model or args.capture_video:  # the final policy, greedy, on the evaluation scenes (and on video)
        result = evaluate(actor, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run.name}-eval" if args.capture_video else None)
        print(f"final eval: {format_eval(result, args.eval_episodes, args.seed + 10_000)}", flush=True)
    run.finish(vector_step=max(counters["vector_step"], num_vector_steps), global_step=global_step,  # PLUMBING
               gradient_steps=grad_steps, last_eval=last_eval)
