"""Equivariant CQL on offline datasets of the close-loop manipulation tasks.

Conservative Q-Learning (Kumar et al. 2020, arXiv 2006.04779), the CQL(H) variant with importance sampling, on top
of SAC, with the C_N-equivariant actor and invariant twin critic of sac_equi_bullet.py, as in "Equivariant Offline
Reinforcement Learning" (Tangri et al. 2024, arXiv 2406.13961). The critic is pushed down on actions the data does
not support (a log-sum-exp over 10 uniform, 10 current-policy and 10 next-policy actions per state) and up on the
data's actions. The image of each state is encoded once per batch and its features are repeated for the 30 action
evaluations (the invariant critic takes the action only at its 1x1 bottleneck). `--cql-lagrange` tunes the penalty
weight so the gap stays near `--cql-target-gap`. `--model cnn` trains the plain-CNN baseline from this same file.

With no `--dataset`, a small planner dataset of `--env-id` is built once (cached) and used, so this just works:

    uv run python cql_equi_offline.py
    uv run python -m cleanrl_equi.offline_data --env-id cleanrl_equi/BlockInBowl-v0 --quality expert --num-episodes 10
    uv run python cql_equi_offline.py --env-id cleanrl_equi/BlockInBowl-v0 --dataset datasets/<file>.npz --model cnn
    uv run python cql_equi_offline.py --eval-checkpoint runs/<run>/cql_equi_offline.cleanrl_model
"""

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.equivariant import count_parameters
from cleanrl_equi.manipulation_rl import (build_networks, check_network_args, evaluate, format_eval, rotate_batch,
                                          run_evaluation, sample_action)
from cleanrl_equi.offline_data import default_dataset, load_dataset
from cleanrl_equi.utils import (CheckpointClock, StopSignal, fail, load_resume, load_state, make_run_name,
                                save_checkpoint, save_resume, set_rng_state, stop_for_requeue)

SCRIPT = os.path.basename(__file__)[: -len(".py")]
LOG_UNIFORM_DENSITY = 5 * math.log(0.5)  # the uniform proposal on [-1, 1]^5


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
    """the learning rate of the critic's optimizer"""
    alpha: float = 0.01
    """initial SAC entropy coefficient"""
    alpha_lr: float = 1e-3
    """the learning rate of the entropy coefficient (automatic tuning, target entropy -5)"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient"""
    cql_weight: float = 1.0
    """weight of the CQL(H) penalty (the fixed weight; with --cql-lagrange it scales the gap before the target)"""
    cql_temperature: float = 1.0
    """temperature T of the log-sum-exp over sampled actions"""
    cql_num_actions: int = 10
    """actions sampled per state from each of: uniform, pi(.|s), pi(.|s')"""
    cql_lagrange: bool = False
    """tune the penalty weight by dual gradient ascent so the CQL gap stays at --cql-target-gap"""
    cql_target_gap: float = 10.0
    """the Lagrange variant's target for log-sum-exp Q - data Q"""
    cql_lagrange_lr: float = 1e-4
    """the learning rate of the Lagrange multiplier"""
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
    for name in ("batch_size", "cql_num_actions", "eval_frequency", "eval_episodes", "num_eval_envs",
                 "log_frequency", "max_steps", "default_dataset_episodes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1.")
    if args.total_timesteps < 0:
        fail("--total-timesteps must not be negative.")
    if args.cql_temperature <= 0:
        fail(f"--cql-temperature must be positive, not {args.cql_temperature}.")
    if args.alpha <= 0:
        fail(f"--alpha must be positive (it is learned as log alpha), not {args.alpha}.")
    if args.cql_weight < 0 or not 0 <= args.tau <= 1:
        fail("--cql-weight must not be negative and --tau must lie in [0, 1].")


# ---- Losses -------------------------------------------------------------------------------------------------------
def cql_gap(q_data: torch.Tensor, q_uniform: torch.Tensor, q_current: torch.Tensor, logp_current: torch.Tensor,
            q_next: torch.Tensor, logp_next: torch.Tensor, temperature: float) -> torch.Tensor:
    """CQL(H) with importance sampling (Kumar et al. 2020, appendix F): T log E_mu[exp(Q(s, a) / T)] estimated with
    samples from uniform, pi(.|s) and pi(.|s') (each Q minus the log-density of its proposal), minus the mean Q of
    the data's actions. The q_* are (B, n) per state and sample, logp_* the proposals' log-densities (B, n).
    The log(3n) of the estimator's mean is a constant and dropped, as in the original."""
    stacked = torch.cat([q_uniform - LOG_UNIFORM_DENSITY, q_current - logp_current, q_next - logp_next], dim=1)
    return temperature * torch.logsumexp(stacked / temperature, dim=1).mean() - q_data.mean()


def repeat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each row n times in a row: (B, ...) -> (B * n, ...), so row b * n + j is sample j of state b."""
    return x.repeat_interleave(n, dim=0)


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
    actor, critic, critic_target = actor.to(device), critic.to(device), critic_target.to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    print(f"{args.model} networks: actor {count_parameters(actor):,} + critic {count_parameters(critic):,} "
          f"parameters, on {device}", flush=True)

    # SAC's automatic entropy tuning, and CQL's Lagrange multiplier (log-parameterised, so it stays positive)
    target_entropy = -5.0  # -dim(action)
    log_alpha = torch.tensor([math.log(args.alpha)], device=device, requires_grad=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    log_cql_alpha = torch.zeros(1, device=device, requires_grad=True)
    cql_alpha_optimizer = torch.optim.Adam([log_cql_alpha], lr=args.cql_lagrange_lr)

    global_step, best = 0, {"success_rate": -1.0, "discounted_return": -1.0}
    if resume is not None:
        for module, key in [(actor, "actor"), (critic, "critic"), (critic_target, "critic_target"),
                            (actor_optimizer, "actor_optimizer"), (critic_optimizer, "critic_optimizer"),
                            (alpha_optimizer, "alpha_optimizer"), (cql_alpha_optimizer, "cql_alpha_optimizer")]:
            load_state(module, resume[key], f"{run_dir}/resume.pt")
        with torch.no_grad():
            log_alpha.copy_(resume["log_alpha"])
            log_cql_alpha.copy_(resume["log_cql_alpha"])
        global_step, best = resume["global_step"], resume["best"]
        print(f"resuming {run_dir} from global step {global_step}", flush=True)
        set_rng_state(resume["rng"])  # last: building the networks above drew random numbers
    alpha = log_alpha.exp().item()

    n = args.cql_num_actions
    stop, clock = StopSignal(), CheckpointClock(args.checkpoint_minutes)
    start_time, start_step, last_progress, last_success = time.time(), global_step, time.time(), float("nan")
    while global_step < args.total_timesteps:
        global_step += 1
        batch = data.sample(args.batch_size, device)
        if args.augment:  # one random turn per transition, for both models (the paper augments every batch)
            batch = rotate_batch(batch, torch.rand(args.batch_size, device=device) * 2 * math.pi)
        obs, next_obs, actions = batch["obs"], batch["next_obs"], batch["actions"]

        # Policy at s (with gradient, for the actor loss; detached samples for the CQL proposals) and at s'
        mean, log_std = actor(obs)
        with torch.no_grad():
            next_mean, next_log_std = actor(next_obs)
            next_actions, next_log_pi = sample_action(next_mean, next_log_std)
            # SAC target with the entropy backup
            qf1_next, qf2_next = critic_target(next_obs, next_actions)
            min_qf_next = torch.min(qf1_next, qf2_next) - alpha * next_log_pi
            next_q_value = batch["rewards"] + (1 - batch["terminated"]) * args.gamma * min_qf_next
            # CQL proposals: n actions per state from uniform, pi(.|s) and pi(.|s'), as (B * n, 5) in state order
            uniform_actions = torch.rand(args.batch_size * n, 5, device=device) * 2 - 1
            current_actions, current_logp = sample_action(repeat_rows(mean, n), repeat_rows(log_std, n))
            next_policy_actions, next_logp = sample_action(repeat_rows(next_mean, n), repeat_rows(next_log_std, n))

        # Critic: s is encoded once; its features are repeated for the 3n proposal actions (only the heads re-run)
        features = critic.encode(obs)
        qf1_a_values, qf2_a_values = critic.q_values(features, actions)
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
        repeated = repeat_rows(features, n)
        proposals = [critic.q_values(repeated, a) for a in (uniform_actions, current_actions, next_policy_actions)]
        (q1_uniform, q2_uniform), (q1_current, q2_current), (q1_next, q2_next) = [
            (q1.view(-1, n), q2.view(-1, n)) for q1, q2 in proposals]
        logp_current, logp_next = current_logp.view(-1, n), next_logp.view(-1, n)
        cql1_gap = cql_gap(qf1_a_values, q1_uniform, q1_current, logp_current, q1_next, logp_next, args.cql_temperature)
        cql2_gap = cql_gap(qf2_a_values, q2_uniform, q2_current, logp_current, q2_next, logp_next, args.cql_temperature)
        if args.cql_lagrange:  # penalty alpha' (w * gap - target): alpha' grows while the gap is above the target
            cql_alpha = log_cql_alpha.exp().clamp(0.0, 1e6)
            cql1_loss = cql_alpha.detach() * (args.cql_weight * cql1_gap - args.cql_target_gap)
            cql2_loss = cql_alpha.detach() * (args.cql_weight * cql2_gap - args.cql_target_gap)
        else:
            cql_alpha = torch.ones(1, device=device)
            cql1_loss, cql2_loss = args.cql_weight * cql1_gap, args.cql_weight * cql2_gap
        qf_loss = qf1_loss + qf2_loss + cql1_loss + cql2_loss
        critic_optimizer.zero_grad()
        qf_loss.backward()
        critic_optimizer.step()
        if args.cql_lagrange:  # dual ascent on alpha' (minimise -penalty)
            gaps = torch.stack([cql1_gap.detach(), cql2_gap.detach()])
            cql_alpha_loss = -(log_cql_alpha.exp() * (args.cql_weight * gaps - args.cql_target_gap)).mean()
            cql_alpha_optimizer.zero_grad()
            cql_alpha_loss.backward()
            cql_alpha_optimizer.step()

        # Actor, with the just-updated Q heads on the (detached) features of s
        pi, log_pi = sample_action(mean, log_std)
        qf1_pi, qf2_pi = critic.q_values(features.detach(), pi)
        actor_loss = (alpha * log_pi - torch.min(qf1_pi, qf2_pi)).mean()
        actor_optimizer.zero_grad()
        actor_loss.backward()
        actor_optimizer.step()
        if args.autotune:
            alpha_loss = (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()
            alpha_optimizer.zero_grad()
            alpha_loss.backward()
            alpha_optimizer.step()
            alpha = log_alpha.exp().item()

        with torch.no_grad():
            for param, target_param in zip(critic.parameters(), critic_target.parameters()):
                target_param.lerp_(param, args.tau)

        if global_step % args.log_frequency == 0:
            writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
            writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
            writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
            writer.add_scalar("losses/cql1_gap", cql1_gap.item(), global_step)
            writer.add_scalar("losses/cql2_gap", cql2_gap.item(), global_step)
            writer.add_scalar("losses/cql_loss", (cql1_loss + cql2_loss).item() / 2.0, global_step)
            writer.add_scalar("losses/cql_alpha", cql_alpha.item(), global_step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
            writer.add_scalar("losses/alpha", alpha, global_step)
            if args.autotune:
                writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
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
                        critic=critic.state_dict(), critic_target=critic_target.state_dict(),
                        actor_optimizer=actor_optimizer.state_dict(), critic_optimizer=critic_optimizer.state_dict(),
                        alpha_optimizer=alpha_optimizer.state_dict(), log_alpha=log_alpha.detach().cpu(),
                        cql_alpha_optimizer=cql_alpha_optimizer.state_dict(),
                        log_cql_alpha=log_cql_alpha.detach().cpu())
            if stop.requested:
                writer.close()
                stop_for_requeue(stop)

    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        save_checkpoint(model_path, SCRIPT, args, actor=actor.state_dict(), critic=critic.state_dict(),
                        critic_target=critic_target.state_dict(), log_alpha=log_alpha.detach().cpu(),
                        global_step=global_step, dataset=dataset_path)
        print(f"model saved to {model_path}", flush=True)
        result = evaluate(actor, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run_name}-eval" if args.capture_video else None)
        print(f"checkpoint eval: {format_eval(result)} over {args.eval_episodes} episodes", flush=True)
    writer.close()
