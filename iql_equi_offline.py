"""Equivariant IQL on offline datasets of the close-loop manipulation tasks.

Implicit Q-Learning (Kostrikov, Nair, Levine 2021, arXiv 2110.06169) with the C_N-equivariant actor and invariant
twin critic of sac_equi_bullet.py and an invariant state value V, as in "Equivariant Offline Reinforcement Learning"
(Tangri et al. 2024, arXiv 2406.13961). It never queries Q at actions outside the data: V(s) is fitted as an upper
expectile of Q(s, a) over the data's actions, Q(s, a) regresses on r + gamma V(s'), and the policy is extracted by
advantage-weighted regression, log pi(a|s) of the data's action weighted by exp(A / beta). The policy is the same
tanh-squashed Gaussian the agent deploys (deterministic action tanh(mean)), and the log-probability of a data
action is taken through the squashing, so what is trained is what runs. `--model cnn` trains the plain baseline.

With no `--dataset`, a small planner dataset of `--env-id` is built once (cached) and used, so this just works:

    uv run python iql_equi_offline.py
    uv run python -m cleanrl_equi.offline_data --env-id cleanrl_equi/BlockInBowl-v0 --quality expert --num-episodes 10
    uv run python iql_equi_offline.py --env-id cleanrl_equi/BlockInBowl-v0 --dataset datasets/<file>.npz --model cnn
    uv run python iql_equi_offline.py --eval-checkpoint runs/<run>/iql_equi_offline.cleanrl_model
"""

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
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.equivariant import count_parameters, enn, gspaces
from cleanrl_equi.manipulation_rl import (CNNEncoder, EquiEncoder, EscnnModule, build_networks, check_network_args,
                                          cnn_width_scale, evaluate, format_eval, rotate_batch, run_evaluation)
from cleanrl_equi.offline_data import default_dataset, load_dataset
from cleanrl_equi.utils import (CheckpointClock, StopSignal, fail, load_resume, load_state, make_run_name,
                                save_checkpoint, save_resume, set_rng_state, stop_for_requeue)

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
    """whether to save the model to `runs/{run_name}` at the end, then evaluate it"""
    eval_checkpoint: Optional[str] = None
    """evaluate this saved model (a `.cleanrl_model` file) for `eval_episodes` episodes instead of training"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it
    holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0
    """write the resume file runs/{run_name}/resume.pt every this many minutes (0 = only on a USR1/TERM signal)"""

    # Data and environment
    env_id: str = "cleanrl_equi/BlockPulling-v0"
    """the manipulation task, `cleanrl_equi/<Task>-v0`: the dataset's task and the evaluation env"""
    dataset: Optional[str] = None
    """an offline dataset file (`python -m cleanrl_equi.offline_data`); default: a cached planner dataset of env_id"""
    default_dataset_episodes: int = 10
    """episodes of the default planner dataset built when no --dataset is given (the paper's 10 expert demos)"""
    image_size: int = 128
    """observation height and width in pixels (must match the dataset)"""
    max_steps: int = 50
    """episode length limit of the evaluation env (BulletArm's 50)"""

    # Networks
    model: str = "equi"
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
    """clip of the exponentiated advantages, so a few large advantages cannot dominate a batch (CORL's 100)"""
    augment: bool = True
    """rotate every batch by random angles (image and (dx, dy) together), for equi and cnn alike (the paper's)"""

    # Evaluation and logging
    eval_frequency: int = 1000
    """evaluate every this many gradient steps (and at the end)"""
    eval_episodes: int = 100
    """episodes per evaluation, with the deterministic action tanh(mean)"""
    num_eval_envs: int = 5
    """parallel environments used by evaluation"""
    log_frequency: int = 100
    """write the loss scalars every this many gradient steps"""
    progress_interval: float = 30.0
    """seconds between progress lines on stdout"""


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence, on settings that cannot work."""
    check_network_args(args)
    for name in ("batch_size", "eval_frequency", "eval_episodes", "num_eval_envs", "log_frequency", "max_steps",
                 "default_dataset_episodes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1.")
    if args.total_timesteps < 0:
        fail("--total-timesteps must not be negative.")
    if not 0 < args.expectile < 1:
        fail(f"--expectile must lie strictly between 0 and 1 (0.5 = mean, the paper's 0.8), not {args.expectile}.")
    if args.beta <= 0 or args.max_exp_advantage <= 0:
        fail("--beta and --max-exp-advantage must be positive.")
    if not 0 <= args.tau <= 1:
        fail(f"--tau must lie in [0, 1], not {args.tau}.")


# ---- State value: invariant, like Q ----------------------------------------------------------------------------------
class EquiValue(EscnnModule):
    """Invariant V(s): the equivariant encoder, a 1x1 conv to n regular fields, ReLU, a max over the group (one
    invariant feature per field) and a 1x1 conv to one invariant value: turning the scene cannot change V."""

    def __init__(self, args: Args):
        super().__init__()
        gspace = gspaces.rot2dOnR2(args.group_order)
        self.encoder = EquiEncoder(gspace, args.n_hidden, args.image_size)
        hidden_type = enn.FieldType(gspace, args.n_hidden * [gspace.regular_repr])
        pooled_type = enn.FieldType(gspace, args.n_hidden * [gspace.trivial_repr])
        self.head = enn.SequentialModule(
            enn.R2Conv(self.encoder.out_type, hidden_type, 1), enn.ReLU(hidden_type, inplace=True),
            enn.GroupPooling(hidden_type), enn.R2Conv(pooled_type, enn.FieldType(gspace, [gspace.trivial_repr]), 1))
        self.train()  # escnn layers are born holding empty filter buffers: drop them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).tensor.flatten()


class CNNValue(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.encoder = CNNEncoder(args)
        hidden = round(cnn_width_scale(args.group_order) * args.n_hidden)
        self.head = nn.Sequential(nn.Linear(self.encoder.out_channels, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).flatten()


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


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        run_evaluation(args, SCRIPT)
        raise SystemExit(0)
    check_args(args)
    dataset_path = args.dataset or default_dataset(args.env_id, args.image_size, args.max_steps,
                                                   num_episodes=args.default_dataset_episodes)
    data = load_dataset(dataset_path, env_id=args.env_id, image_size=args.image_size)
    print(f"dataset {dataset_path}: {data.num_episodes} episodes, {len(data)} transitions, "
          f"{data.metadata.get('quality', '?')} data", flush=True)

    run_name = make_run_name(args.run_name, args.env_id.replace("/", "_"), args.exp_name, args.seed)
    run_dir = f"runs/{run_name}"

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    resume = load_resume(run_dir, SCRIPT, args)

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, resume="allow", id=run_name)
    writer = SummaryWriter(run_dir, purge_step=resume["global_step"] + 1 if resume else None)
    if resume is None:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    actor, critic = build_networks(args)
    _, critic_target = build_networks(args)
    value = EquiValue(args) if args.model == "equi" else CNNValue(args)
    actor, critic, critic_target, value = (net.to(device) for net in (actor, critic, critic_target, value))
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    value_optimizer = torch.optim.Adam(value.parameters(), lr=args.value_lr)
    print(f"{args.model} networks: actor {count_parameters(actor):,} + critic {count_parameters(critic):,} + value "
          f"{count_parameters(value):,} parameters, on {device}", flush=True)

    global_step, best = 0, {"success_rate": -1.0, "discounted_return": -1.0}
    if resume is not None:
        for module, key in [(actor, "actor"), (critic, "critic"), (critic_target, "critic_target"), (value, "value"),
                            (actor_optimizer, "actor_optimizer"), (critic_optimizer, "critic_optimizer"),
                            (value_optimizer, "value_optimizer")]:
            load_state(module, resume[key], f"{run_dir}/resume.pt")
        global_step, best = resume["global_step"], resume["best"]
        print(f"resuming {run_dir} from global step {global_step}", flush=True)
        set_rng_state(resume["rng"])  # last: building the networks above drew random numbers

    stop, clock = StopSignal(), CheckpointClock(args.checkpoint_minutes)
    start_time, start_step, last_progress, last_success = time.time(), global_step, time.time(), float("nan")
    while global_step < args.total_timesteps:
        global_step += 1
        batch = data.sample(args.batch_size, device)
        if args.augment:  # one random turn per transition, for both models (the paper augments every batch)
            batch = rotate_batch(batch, torch.rand(args.batch_size, device=device) * 2 * math.pi)
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
        actor_optimizer.zero_grad()
        actor_loss.backward()
        actor_optimizer.step()

        with torch.no_grad():
            for param, target_param in zip(critic.parameters(), critic_target.parameters()):
                target_param.lerp_(param, args.tau)

        if global_step % args.log_frequency == 0:
            writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
            writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
            writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
            writer.add_scalar("losses/value_loss", value_loss.item(), global_step)
            writer.add_scalar("losses/values", v.mean().item(), global_step)
            writer.add_scalar("losses/advantage", advantage.mean().item(), global_step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
            writer.add_scalar("losses/log_prob", log_prob.mean().item(), global_step)
            writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)

        final = global_step == args.total_timesteps
        if global_step % args.eval_frequency == 0 or final:
            result = evaluate(actor, args, device, seed=args.seed + 10_000 + global_step)
            for key, number in result.items():
                writer.add_scalar(f"eval/{key}", number, global_step)
            for key in ("success_rate", "discounted_return"):
                best[key] = max(best[key], result[key])
                writer.add_scalar(f"eval/best_{key}", best[key], global_step)
            last_success = result["success_rate"]
            print(f"eval @ {global_step} gradient steps: {format_eval(result)}", flush=True)
        if time.time() - last_progress > args.progress_interval or final:
            last_progress = time.time()
            sps = (global_step - start_step) / (time.time() - start_time)
            print(f"step {global_step}/{args.total_timesteps} | SPS {sps:.2f} | last eval success {last_success:.2f} | "
                  f"best {best['success_rate']:.2f} | {(args.total_timesteps - global_step) / max(sps, 1e-9) / 60:.1f} "
                  "min left", flush=True)

        if stop.requested or clock.due():  # escnn: networks are in train mode here, so state_dicts hold parameters
            save_resume(run_dir, SCRIPT, args, global_step=global_step, best=best, actor=actor.state_dict(),
                        critic=critic.state_dict(), critic_target=critic_target.state_dict(), value=value.state_dict(),
                        actor_optimizer=actor_optimizer.state_dict(), critic_optimizer=critic_optimizer.state_dict(),
                        value_optimizer=value_optimizer.state_dict())
            if stop.requested:
                writer.close()
                stop_for_requeue(stop)

    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        save_checkpoint(model_path, SCRIPT, args, actor=actor.state_dict(), critic=critic.state_dict(),
                        critic_target=critic_target.state_dict(), value=value.state_dict(),
                        global_step=global_step, dataset=dataset_path)
        print(f"model saved to {model_path}", flush=True)
        result = evaluate(actor, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run_name}-eval" if args.capture_video else None)
        print(f"checkpoint eval: {format_eval(result)} over {args.eval_episodes} episodes", flush=True)
    writer.close()
