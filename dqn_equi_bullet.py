"""Equivariant DQN on the close-loop manipulation tasks, with planner demonstrations in the replay buffer.

DQN (Mnih et al. 2015) with the C4-equivariant Q network of "SO(2)-Equivariant Reinforcement Learning" (Wang,
Walters, Platt, ICLR 2022), the released code's `dqn_com` agent ("composed": one Q value for every combination of
the action components, maximised jointly). The action a = (p, dx, dy, dz, dtheta) is discretised to 162 choices:
p in {closed, open}, (dx, dy) on a 3 x 3 grid, dz and dtheta in {-1, 0, +1} steps of `--dpos` metres and
pi / `--drot-n` radians. The top-down image is centred on the gripper and aligned with the world, so the network
computes Q for the nine (dx, dy) moves as a 3 x 3 image whose pixel (row i, column j) is the move
((i - 1) dpos, (j - 1) dpos): turning the world by a quarter turn turns the input image and this Q map alike,
while the 18 channels of each pixel (dz x dtheta x p) do not change. The C4 network is built to do exactly that
(escnn), so what is learned in one orientation holds in all four. `--model cnn` trains the paper's plain-CNN
baseline from this same file.

The envs default to the paper's setting (0.4 m workspace, 100-step episodes, its task sizes) with the paper DQN's
finer steps (0.02 m, pi/16); every env flag of the manipulation scripts applies (`ManipulationEnvArgs`: the
scene, the steps, the optional force penalty and compliance). Planner demonstrations fill the buffer before
learning: the planners plan for this grid of whole steps (`expert_action(discrete=True)`), so each of their actions
is one of the 162. The loss is the Huber TD error against a soft-updated target network (tau 0.01 every step),
with the plain max over all 162 actions in the target (no double DQN), as in the released code. Evaluation acts
greedily and logs the same `eval/` metrics as the other manipulation scripts.

Exploration: by default the agent acts greedily (epsilon 0), as the released code runs: its epsilon schedule
defaults to no exploration steps and a final epsilon of 0, and the paper's commands leave it so. What it tries
then comes from the demonstrations and from its own changing Q values. `--start-e`, `--end-e` and
`--exploration-fraction` give CleanRL's linear epsilon schedule instead (a random action is uniform over the 162).

    uv run python dqn_equi_bullet.py --env-id cleanrl_equi/BlockPulling-v0          # the paper's settings (GPU)
    uv run python dqn_equi_bullet.py --model cnn                                     # the plain baseline
    uv run python dqn_equi_bullet.py --eval-checkpoint runs/<run>/dqn_equi_bullet.cleanrl_model
    # the CPU preset of benchmarks/dqn_learning.py (BulletArm's smaller scene, 32 px, n_hidden 16, lr 1e-3)
    OMP_NUM_THREADS=1 uv run python dqn_equi_bullet.py --workspace-size 0.3 --max-steps 50 --no-paper-tasks \
        --image-size 32 --n-hidden 16 --learning-rate 1e-3 --eval-frequency 250 --eval-episodes 50 --no-cuda
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

from cleanrl_equi.buffers import ReplayBuffer
from cleanrl_equi.checkpoints import load_checkpoint, load_state, saved_weights  # PLUMBING
from cleanrl_equi.compile import channels_last, check_compile_flags, compiled, with_bf16_autocast  # SPEED
from cleanrl_equi.envs.manipulation import (ManipulationEnvArgs, evaluate, evaluate_checkpoint, format_eval,
                                            make_envs, obs_to_tensor)
from cleanrl_equi.equivariant import EscnnModule, TensorToField, count_parameters, enn, gspaces
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
    """write the resume file runs/{run_name}/resume.pt (networks, optimiser, RNG and the replay buffer) every this
    many minutes (0 = only on a USR1/TERM signal)"""

    # Environment: the task and its settings come from ManipulationEnvArgs (the paper's setting by default)
    dpos: float = 0.02
    """metres the gripper moves per step of dx, dy, dz: the paper's DQN moves by 0.02 (its SAC by up to 0.05), as a
    discrete action takes one step of each, so a fine step is what lets it place the gripper precisely"""
    drot_n: int = 16
    """one step of dtheta turns the gripper by pi / drot_n radians: the paper's DQN turns by pi/16 (its SAC by up to
    pi/8), for the same reason"""
    num_envs: int = 5
    """the number of parallel training environments (the paper's 5)"""
    async_envs: bool = False
    """run each environment in its own process (gymnasium's AsyncVectorEnv); worth it with spare CPU cores"""

    # Network
    model: Literal["equi", "cnn"] = "equi"
    """`equi`: C4-equivariant Q network (escnn); `cnn`: the paper's plain-CNN baseline"""
    n_hidden: int = 128
    """width n: the equivariant network has n/8, n/4, n/2, n, 2n, 2n regular fields of C4 (paper: 128, 2.6M
    parameters); the CNN has twice as many channels as that has fields (paper: 3.9M)"""

    # Algorithm
    total_timesteps: int = 100000
    """environment steps taken by the agent (demos not included); one gradient step per vector step"""
    buffer_size: int = 100000
    """replay buffer capacity in transitions (each observation stored once, as uint8)"""
    gamma: float = 0.95
    """the discount factor gamma"""
    tau: float = 0.01
    """target network Polyak coefficient, applied after every gradient step"""
    batch_size: int = 32
    """the batch size of samples from the replay buffer"""
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimiser"""
    learning_starts: int = 100
    """gradient steps start once the buffer holds this many transitions (demos included)"""
    updates_per_step: int = 1
    """gradient steps per vector step (of `num_envs` transitions)"""
    num_demos: int = 100
    """successful planner demonstration episodes put in the buffer before learning"""
    max_demo_attempts: int = 2000
    """planner episodes tried at most while collecting `num_demos` successful ones"""
    start_e: float = 0.0
    """the starting epsilon of epsilon-greedy exploration (0: greedy, as the released code runs)"""
    end_e: float = 0.0
    """the final epsilon, reached after `exploration_fraction` of `total_timesteps`"""
    exploration_fraction: float = 0.5
    """the fraction of `total_timesteps` over which epsilon goes linearly from `start_e` to `end_e`"""

    # Evaluation and logging
    eval_frequency: int = 500
    """evaluate every this many gradient steps (and at the end)"""
    eval_episodes: int = 100
    """episodes per evaluation, with the greedy action"""
    num_eval_envs: int = 5
    """parallel environments used by evaluation"""
    log_frequency: int = 100
    """write the loss scalars every this many gradient steps"""
    progress_interval: float = 30.0  # PLUMBING
    """seconds between progress lines on stdout"""
    compile: bool = False  # SPEED
    """torch.compile the acting network and the update step (loss, backward, optimizer step, target update): the
    same algorithm. escnn layers cannot be traced (they run eagerly between the compiled parts of the update); the
    equivariant network acts through a plain-torch copy"""
    cudagraphs: bool = False  # SPEED
    """like --compile, and replay each step as a recorded CUDA graph (torch.compile "reduce-overhead" mode; GPU only)"""
    bf16: bool = False  # SPEED
    """run the Q networks' forward passes in the update in bfloat16 mixed precision (torch.autocast; weights, optimizer
    state, TD targets and the loss stay float32); CPUs with AVX512-BF16/AMX and recent GPUs"""


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence, on settings that cannot work."""
    args.check_env_settings()
    if args.n_hidden < 8 or args.n_hidden % 8 != 0:
        fail(f"--n-hidden {args.n_hidden} must be a multiple of 8 (the first layer has n/8 fields).")
    require(args, positive=("learning_rate",), fractions=("gamma", "tau", "start_e", "end_e", "exploration_fraction"),
            non_negative=("num_demos", "learning_starts"),
            at_least_one=("total_timesteps", "num_envs", "num_eval_envs", "batch_size", "eval_frequency",
                          "eval_episodes", "log_frequency", "updates_per_step"))
    if args.num_demos > args.max_demo_attempts:
        fail(f"--max-demo-attempts {args.max_demo_attempts} is less than --num-demos {args.num_demos}; raise it.")
    if args.buffer_size < max(args.batch_size, args.learning_starts, 2 * args.num_envs):
        fail(f"--buffer-size {args.buffer_size} is smaller than a batch or --learning-starts; raise it.")
    if args.buffer_size // args.num_envs <= args.max_steps:
        fail(f"--buffer-size {args.buffer_size} holds less than one episode per env; raise it.")
    if args.learning_starts < args.batch_size:
        fail(f"--learning-starts {args.learning_starts} is less than --batch-size {args.batch_size}: the first batch "
             "would be larger than the data; raise --learning-starts.")
    check_compile_flags(args, device_for(args))  # SPEED


# ---- The discrete actions --------------------------------------------------------------------------------------------
# 162 actions, indexed as the network's output flattened: index = channel * 9 + 3 * row + column, where (row,
# column) of the 3 x 3 map is the (dx, dy) move and channel = (dz * 3 + dtheta) * 2 + p indexes the 18 invariant
# choices (each of dz, dtheta in 0, 1, 2 = -1, 0, +1 steps; p 0 = closed, 1 = open), the released code's order.
NUM_ACTIONS, NUM_CHANNELS = 162, 18


def decode_actions(index: np.ndarray) -> np.ndarray:
    """Action indices (B,) -> the env's normalised actions (B, 5) = (p, dx, dy, dz, dtheta) in {-1, 0, 1}."""
    channel, cell = np.divmod(np.asarray(index), 9)
    row, column = np.divmod(cell, 3)
    dz, rest = np.divmod(channel, 6)
    dtheta, p = np.divmod(rest, 2)
    return np.stack([2 * p - 1, row - 1, column - 1, dz - 1, dtheta - 1], axis=1).astype(np.float32)


def encode_actions(actions: np.ndarray) -> np.ndarray:
    """Normalised continuous actions (B, 5) -> the index of the nearest discrete action (the released code's
    nearest-neighbour discretisation of planner actions). Rounding half to even is odd-symmetric, so a turned
    planner action discretises to the turned discrete action and the demonstrations keep the task's symmetry."""
    steps = np.clip(np.rint(np.asarray(actions, dtype=np.float64)), -1, 1).astype(np.int64) + 1
    p = (np.asarray(actions)[:, 0] > 0).astype(np.int64)  # half-open (0) is closed: the released tie-break
    return ((steps[:, 3] * 3 + steps[:, 4]) * 2 + p) * 9 + 3 * steps[:, 1] + steps[:, 2]


# ---- Networks --------------------------------------------------------------------------------------------------------
# Symmetry: a quarter turn g of the world about the gripper axis turns the image by g, turns the best (dx, dy) by g
# and leaves dz, dtheta and p unchanged. Q is a function of (image, action), so Q(g image, g move, rest) =
# Q(image, move, rest): the 3 x 3 map of moves must turn with the image and its channels must not change. A
# network of C4 regular fields (features that turn with the image) whose last layer maps them to 18 invariant
# (trivial) fields on a 3 x 3 grid is equivariant in exactly this sense. The grid maps onto itself only under
# quarter turns, so the group is C4 (the released class hard-codes it too). The CNN baseline is the same schedule
# with plain convolutions; the two sit side by side so a diff of the two shows where the symmetry enters.
def layer_plan(n_hidden: int, image_size: int) -> list[tuple[int, int, bool]]:
    """The 3x3 conv layers as (width, padding, max-pool after) for an image_size x image_size input.

    The paper's 128-pixel schedule is 128 -> 64 -> 32 -> 16 -> 8 (padded convs, each followed by a 2x2 max-pool, of
    widths n/8, n/4, n/2, n), then a padded conv of width 2n at 8x8 and an unpadded conv of width 2n (8 -> 6) and a
    pool (-> 3): the 3 x 3 grid of (dx, dy) moves. A smaller image drops the first (narrowest) halving layers;
    every stage keeps the grid symmetric, so quarter turns stay exact.
    """
    halvings = int(round(math.log2(image_size // 8)))
    widths = [max(1, n_hidden >> shift) for shift in range(halvings - 1, -1, -1)]  # ..., n/4, n/2, n
    return [(w, 1, True) for w in widths] + [(2 * n_hidden, 1, False), (2 * n_hidden, 0, True)]


class EquiQNetwork(EscnnModule):
    """Image (B, 2, S, S) -> Q map (B, 18, 3, 3), as the paper's network: the conv schedule of `layer_plan`, then a
    1x1 conv to the 18 values (dz, dtheta, p) of each of the 3 x 3 moves. Equivariant: `width` regular fields of C4
    per layer (4 channels each, turning with the image), 18 invariant fields out; 2.6M parameters at n = 128."""

    def __init__(self, args: Args):
        super().__init__()
        gspace = gspaces.rot2dOnR2(4)
        features = enn.FieldType(gspace, 2 * [gspace.trivial_repr])  # height and holding flag: turned, not changed
        self.input = TensorToField(features)
        layers = []
        for width, padding, pool in layer_plan(args.n_hidden, args.image_size):
            hidden = enn.FieldType(gspace, width * [gspace.regular_repr])
            layers += [enn.R2Conv(features, hidden, 3, padding=padding), enn.ReLU(hidden, inplace=True)]
            if pool:
                layers.append(enn.PointwiseMaxPool2D(hidden, 2))
            features = hidden
        layers.append(enn.R2Conv(features, enn.FieldType(gspace, NUM_CHANNELS * [gspace.trivial_repr]), 1))
        self.net = enn.SequentialModule(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input(x)).tensor


class CNNQNetwork(nn.Module):
    """Image (B, 2, S, S) -> Q map (B, 18, 3, 3), as the paper's network: the conv schedule of `layer_plan`, then a
    1x1 conv to the 18 values (dz, dtheta, p) of each of the 3 x 3 moves. Plain: 2 x `width` channels per layer
    (half the channels of the equivariant layer's fields), 18 channels out; 3.9M parameters at n = 128."""

    def __init__(self, args: Args):
        super().__init__()
        features = 2  # height and holding flag
        layers = []
        for width, padding, pool in layer_plan(args.n_hidden, args.image_size):
            hidden = 2 * width
            layers += [nn.Conv2d(features, hidden, 3, padding=padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            features = hidden
        layers.append(nn.Conv2d(features, NUM_CHANNELS, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_q_network(args: Args) -> nn.Module:
    return EquiQNetwork(args) if args.model == "equi" else CNNQNetwork(args)


def load_q_network(path: str, device: torch.device) -> tuple[nn.Module, Args]:  # PLUMBING: --eval-checkpoint
    """The Q network saved with --save-model and the settings it was trained with (one sentence if it does not
    fit)."""
    checkpoint = load_checkpoint(path, SCRIPT)
    saved = Args(**{k: v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__})
    q_network = make_q_network(saved)
    load_state(q_network, saved_weights(checkpoint, "q_network", path), path)
    return q_network.to(device), saved


def greedy_actions(q_network: nn.Module, obs: np.ndarray, device: torch.device) -> np.ndarray:
    """The index of the largest Q value for each observation (call under no_grad)."""
    return q_network(obs_to_tensor(obs, device)).flatten(1).argmax(1).cpu().numpy()


def greedy_env_action(q_network: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """The env action of the largest Q value: the evaluation policy (`evaluate`'s `act`)."""
    return torch.as_tensor(decode_actions(q_network(obs).flatten(1).argmax(1).cpu().numpy()))


def update_step(q_network: nn.Module, target_network: nn.Module, optimizer: torch.optim.Optimizer, args: Args,
                data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One gradient step of the TD loss and the soft target update (one function, so that `--compile` compiles all
    of it); returns the loss and the mean Q value of the batch's actions (detached tensors: no host sync here)."""
    with torch.no_grad():  # the released code's target: the plain max over all 162 actions, no double DQN
        target_max = target_network(data["next_obs"]).flatten(1).float().max(1).values
        td_target = data["rewards"] + args.gamma * target_max * (1 - data["terminated"])
    old_val = q_network(data["obs"]).flatten(1).float().gather(1, data["actions"][:, None]).squeeze(1)
    loss = F.smooth_l1_loss(old_val, td_target)  # Huber, as in the released code
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    # update the target network (soft, every step: the released code's DQN disables the hard update)
    with torch.no_grad():
        for param, target_param in zip(q_network.parameters(), target_network.parameters()):
            target_param.lerp_(param, args.tau)
    return {"td_loss": loss.detach(), "q_values": old_val.detach().mean()}


GREEDY = "greedy action"  # how the evaluation lines name the policy


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    """Epsilon goes linearly from start_e to end_e over `duration` steps, then stays at end_e (CleanRL's DQN)."""
    return end_e if duration <= 0 else start_e + (end_e - start_e) * min(t / duration, 1.0)


def collect_demos(envs, rb: ReplayBuffer, args: Args) -> tuple[int, int, int]:
    """Planner episodes, discretised to the nearest discrete action, through the training envs; only the ones that
    succeed stay in the buffer (as in the later released code). The planners plan for whole steps
    (`expert_action(discrete=True)`): a waypoint counts as reached within half a step, where their continuous
    tolerances (5 mm, 0.05 rad) are finer than this grid and a rounded continuous planner stops short and waits
    (about 9 in 10 Block Pulling episodes at dpos 0.02, dtheta pi/16 then fail). Their actions are already on the
    grid, so the rounding here changes nothing. Returns (kept episodes, their transitions, attempts)."""
    obs, _ = envs.reset(seed=args.seed)
    rb.start(obs)
    resetting = np.zeros(args.num_envs, dtype=bool)
    episode_rows: list[list[int]] = [[] for _ in range(args.num_envs)]
    kept, transitions, attempts = 0, 0, 0
    last_report = time.time()  # PLUMBING
    while kept < args.num_demos and attempts < args.max_demo_attempts:
        if time.time() - last_report >= args.progress_interval:  # PLUMBING: collecting takes a minute or more
            last_report = time.time()
            print(f"demos: {kept}/{args.num_demos} kept of {attempts} planner episodes", flush=True)
        actions = encode_actions(np.stack(envs.unwrapped.call("expert_action", discrete=True)))
        obs, rewards, terminations, truncations, infos = envs.step(decode_actions(actions))
        row = rb.add(actions, rewards, terminations, ~resetting, obs, expert=True)
        for i in np.flatnonzero(~resetting):
            episode_rows[i].append(row)
        for i in np.flatnonzero(np.logical_or(terminations, truncations)):
            attempts += 1
            if infos["is_success"][i] and kept < args.num_demos:
                kept, transitions = kept + 1, transitions + len(episode_rows[i])
            else:
                rb.valid[episode_rows[i], i] = False
            episode_rows[i] = []
        resetting = np.logical_or(terminations, truncations)
    for i, rows in enumerate(episode_rows):  # episodes still running when enough demos were kept
        rb.valid[rows, i] = False
    return kept, transitions, attempts


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:  # PLUMBING: evaluate a saved model instead of training
        evaluate_checkpoint(*load_q_network(args.eval_checkpoint, device_for(args)), args, device_for(args),
                            act=greedy_env_action, policy=GREEDY)
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
    envs = make_envs(args, args.num_envs, args.async_envs, physics_metrics=False)  # evaluation measures them

    q_network = make_q_network(args).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    target_network = copy.deepcopy(q_network).requires_grad_(False)
    print(f"{args.model} Q network: {count_parameters(q_network):,} parameters", flush=True)

    acting_network, update = q_network, update_step
    update = with_bf16_autocast(update, args, device)  # SPEED: the forward passes in bfloat16, the heads float32
    if args.compile:  # SPEED: dynamo cannot trace escnn, so the equivariant network acts through a plain-torch copy
        acting_network = compiled(plain_copy(q_network), args)
    update = compiled(update, args)  # SPEED
    update = through_traced(update, q_network, target_network) if args.compile else update  # SPEED: traceable escnn

    rb = ReplayBuffer(args.buffer_size, args.num_envs, args.image_size, action_shape=(), action_dtype=np.int16)

    # Planner demonstrations, through the same envs, before any learning
    num_demos = args.num_demos
    num_demos = 0 if run.saved is not None else num_demos  # PLUMBING: a resumed run has its demos in its buffer
    if num_demos > 0:
        print(f"collecting {num_demos} planner demonstrations", flush=True)  # PLUMBING
        kept, transitions, attempts = collect_demos(envs, rb, args)
        print(f"{kept} demo episodes ({transitions} transitions) kept of {attempts} discretised planner episodes",
              flush=True)
        if kept < args.num_demos:
            print(f"warning: only {kept} of --num-demos {args.num_demos} planner episodes succeeded within "
                  f"--max-demo-attempts {args.max_demo_attempts}", flush=True)

    # PLUMBING: what a resumed run continues from (its demos are in the saved buffer; the envs start fresh episodes)
    run.keep(q_network=q_network, target_network=target_network, optimizer=optimizer, replay_buffer=rb)  # PLUMBING
    counters = dict(vector_step=0, global_step=0, gradient_steps=0, last_eval=-1)
    counters = run.resume(**counters)  # PLUMBING
    global_step, grad_steps, last_eval = counters["global_step"], counters["gradient_steps"], counters["last_eval"]
    obs, _ = envs.reset(seed=args.seed + 1 + counters["vector_step"])
    rb.start(obs)
    resetting = np.zeros(args.num_envs, dtype=bool)

    # TRY NOT TO MODIFY: start the game
    start_time = time.time()
    update_time, start_grad_steps, last_success = 0.0, grad_steps, float("nan")
    num_vector_steps = args.total_timesteps // args.num_envs
    for vector_step in range(counters["vector_step"], num_vector_steps):
        # PLUMBING: periodic resume file; on USR1/TERM also stop here (and requeue under SLURM)
        run.checkpoint(vector_step=vector_step, global_step=global_step, gradient_steps=grad_steps,  # PLUMBING
                       last_eval=last_eval)
        global_step += args.num_envs
        # ALGO LOGIC: put action logic here (train mode, no_grad: escnn builds fresh filters from current weights)
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps,
                                  global_step)
        with torch.no_grad():
            refresh(acting_network, q_network)  # SPEED: the plain copy takes the updated weights
            actions = greedy_actions(acting_network, obs, device)
        explore = np.random.rand(args.num_envs) < epsilon
        actions[explore] = np.random.randint(NUM_ACTIONS, size=int(explore.sum()))

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(decode_actions(actions))
        if "_episode" in infos:
            for i in np.flatnonzero(infos["_episode"]):
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)
                writer.add_scalar("charts/episodic_success", float(infos["is_success"][i]), global_step)
        rb.add(actions, rewards, terminations, ~resetting, next_obs)
        resetting = np.logical_or(terminations, truncations)
        obs = next_obs

        # ALGO LOGIC: training.
        if len(rb) < args.learning_starts:
            continue
        update_start = time.time()
        for _ in range(args.updates_per_step):
            data = rb.sample(args.batch_size, device)
            data = channels_last(data)  # SPEED: channels-last convolutions are faster on CPUs (README "Speed")
            grad_steps += 1
            stats = update(q_network, target_network, optimizer, args, data)
        update_time += time.time() - update_start
        updates_per_second = (grad_steps - start_grad_steps) / max(update_time, 1e-9)

        if grad_steps % args.log_frequency < args.updates_per_step:
            writer.add_scalar("losses/td_loss", stats["td_loss"].item(), global_step)
            writer.add_scalar("losses/q_values", stats["q_values"].item(), global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            sps = int(global_step / (time.time() - start_time))
            sps = int(run.sps(global_step))  # PLUMBING: the steps of this process (a resumed run counts anew)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/updates_per_second", updates_per_second, global_step)
            writer.add_scalar("charts/gradient_steps", grad_steps, global_step)

        final = vector_step == num_vector_steps - 1
        if (grad_steps % args.eval_frequency < args.updates_per_step or final) and last_eval != grad_steps:
            last_eval = grad_steps
            result = evaluate(q_network, args, device, seed=args.seed + 10_000 + grad_steps, act=greedy_env_action)
            for key, value in result.items():
                writer.add_scalar(f"eval/{key}", value, global_step)
            writer.add_scalar("eval/gradient_steps", grad_steps, global_step)
            last_success = result["success_rate"]
            print(f"eval @ {grad_steps} gradient steps: "
                  f"{format_eval(result, args.eval_episodes, args.seed + 10_000 + grad_steps, GREEDY)}", flush=True)
        run.progress(global_step, num_vector_steps * args.num_envs, f"{grad_steps} gradient steps",  # PLUMBING
                     f"updates/s {updates_per_second:.2f}", f"epsilon {epsilon:.3f}",
                     "no evaluation yet" if math.isnan(last_success) else f"last eval success {last_success:.2f}",
                     force=final)

    envs.close()
    if args.save_model:  # PLUMBING: the model file, with the script's name and settings
        run.save_model(q_network=q_network.state_dict(), target_network=target_network.state_dict(),
                       global_step=global_step, gradient_steps=grad_steps)
    if args.save_model or args.capture_video:  # the final policy, greedy, on the evaluation scenes (and on video)
        result = evaluate(q_network, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run_name}-eval" if args.capture_video else None, act=greedy_env_action)
        print(f"final eval: {format_eval(result, args.eval_episodes, args.seed + 10_000, GREEDY)}", flush=True)
    run.finish(vector_step=max(counters["vector_step"], num_vector_steps), global_step=global_step,  # PLUMBING
               gradient_steps=grad_steps, last_eval=last_eval)
    writer.close()
