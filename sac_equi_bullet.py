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

Smooth, gentle motion: CAPS (Mysore et al. 2021, "Regularizing Action Policies for Smooth Control with
Reinforcement Learning") adds a temporal term (the policy's action at s_t vs at s_{t+1}) and a spatial term (at s
vs at a perturbed s) to the actor loss (`--caps-temporal-weight`, `--caps-spatial-weight`; off by default).
Evaluation logs how smooth the executed actions are (`eval/action_smoothness`, `eval/action_change`).

    uv run python sac_equi_bullet.py --env-id cleanrl_equi/BlockPulling-v0 --total-timesteps 100000
    uv run python sac_equi_bullet.py --model cnn                         # the plain baseline
    uv run python sac_equi_bullet.py --demo-loss-weight 1                # SACfD
    uv run python sac_equi_bullet.py --eval-checkpoint runs/<run>/sac_equi_bullet.cleanrl_model
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

from cleanrl_equi.equivariant import count_parameters
from cleanrl_equi.manipulation_rl import (build_networks, check_network_args, evaluate, format_eval, make_envs,
                                          obs_to_tensor, rotate_batch, run_evaluation, sample_action,
                                          stored_obs_to_tensor)
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
    """observation height and width in pixels: 16, 32, 64, 128 (paper) or 256"""
    max_steps: int = 50
    """episode length limit (BulletArm's 50; the ICLR paper used 100)"""
    num_envs: int = 5
    """the number of parallel training environments"""
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
    """planner demonstration episodes put in the buffer before learning"""
    demo_loss_weight: float = 0.0
    """SACfD: weight of the MSE between the sampled action and the expert action on demo samples (0 = plain SAC)"""
    aug_copies: int = 4
    """buffer augmentation: each sampled transition is one of itself + this many copies rotated by random angles"""

    # Smooth-motion prior (CAPS) and its metric
    caps_temporal_weight: float = 0.0
    """CAPS temporal term: weight of |mu(s_t) - mu(s_t+1)|^2 in the actor loss (0 = off)"""
    caps_spatial_weight: float = 0.0
    """CAPS spatial term: weight of |mu(s) - mu(s + noise)|^2 in the actor loss (0 = off)"""
    caps_sigma: float = 0.01
    """std of the Gaussian noise on the height channel (in [0, 1] image units; 0.01 = 2.55 mm) for the spatial term"""

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


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence, on settings that cannot work."""
    check_network_args(args)
    for name in ("num_envs", "num_eval_envs", "batch_size", "eval_frequency", "eval_episodes", "log_frequency",
                 "updates_per_step", "max_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1.")
    for name in ("num_demos", "aug_copies", "total_timesteps", "learning_starts"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must not be negative.")
    if args.buffer_size < max(args.batch_size, args.learning_starts, 2 * args.num_envs):
        fail(f"--buffer-size {args.buffer_size} is smaller than a batch or --learning-starts; raise it.")
    if args.learning_starts < args.batch_size:
        fail(f"--learning-starts {args.learning_starts} is less than --batch-size {args.batch_size}: the first batch "
             "would be larger than the data; raise --learning-starts.")
    if args.demo_loss_weight > 0 and args.num_demos == 0:
        fail("--demo-loss-weight needs demonstrations; set --num-demos to at least 1 (or the weight to 0).")
    if min(args.demo_loss_weight, args.caps_temporal_weight, args.caps_spatial_weight, args.caps_sigma) < 0:
        fail("loss weights and --caps-sigma must not be negative.")


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


# ---- Replay buffer and augmentation ---------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions of `num_envs` parallel streams, each observation stored once.

    Row i holds, for every env, the observation s_i (height channel as uint8, holding flag as one bool) and the
    transition (a_i, r_i, terminated_i) that left it; s_{i+1} is the next row's observation. The step in which a
    vector env resets an env after an episode end (gymnasium's next-step autoreset) is stored as an invalid row,
    so no transition ever joins two episodes. 100k transitions of 128x128 images take 1.6 GB (16 KiB each).
    """

    def __init__(self, capacity: int, num_envs: int, image_size: int):
        self.rows, self.num_envs, self.pos = capacity // num_envs, num_envs, 0
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
        self.pos = (p + 1) % self.rows
        self._put_observation(next_obs)

    def __len__(self) -> int:
        return int(self.valid.sum())

    def state_dict(self) -> dict:
        return {"pos": self.pos, **{k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}}

    def load_state_dict(self, state: dict) -> None:
        for key, array in vars(self).items():
            if isinstance(array, np.ndarray):
                if state[key].shape != array.shape:
                    raise ValueError(f"replay buffer {key} has shape {state[key].shape}, not {array.shape}")
                array[...] = state[key]
        self.pos = state["pos"]

    def sample(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        flat = np.random.choice(np.flatnonzero(self.valid.ravel()), batch_size)
        rows, envs = np.divmod(flat, self.num_envs)
        next_rows = (rows + 1) % self.rows

        as_tensor = lambda a: torch.as_tensor(a[rows, envs], device=device)  # noqa: E731
        return {"obs": stored_obs_to_tensor(self.heights[rows, envs], self.holding[rows, envs], device),
                "next_obs": stored_obs_to_tensor(self.heights[next_rows, envs], self.holding[next_rows, envs], device),
                "actions": as_tensor(self.actions),
                "rewards": as_tensor(self.rewards), "terminated": as_tensor(self.terminated).float(),
                "expert": as_tensor(self.expert)}


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
        run_evaluation(args, SCRIPT)
        raise SystemExit(0)
    check_args(args)
    run_name = make_run_name(args.run_name, args.env_id.replace("/", "_"), args.exp_name, args.seed)  # no subfolder
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
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True, resume="allow", id=run_name)
    writer = SummaryWriter(run_dir, purge_step=resume["global_step"] + 1 if resume else None)
    if resume is None:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup
    envs = make_envs(args, args.num_envs, args.async_envs)

    actor, critic = build_networks(args)
    _, critic_target = build_networks(args)
    actor, critic, critic_target = actor.to(device), critic.to(device), critic_target.to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    print(f"{args.model} networks: actor {count_parameters(actor):,} + critic {count_parameters(critic):,} "
          f"parameters, on {device}", flush=True)

    # Automatic entropy tuning
    target_entropy = -5.0  # -dim(action)
    log_alpha = torch.tensor([math.log(args.alpha)], device=device, requires_grad=args.autotune)
    alpha = log_alpha.exp().item()
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)

    rb = ReplayBuffer(args.buffer_size, args.num_envs, args.image_size)
    start_vector_step, grad_steps, last_eval = 0, 0, None
    if resume is not None:  # the demos are in the saved buffer; the envs start fresh episodes (seeded anew)
        resume_path = f"{run_dir}/resume.pt"
        for module, key in [(actor, "actor"), (critic, "critic"), (critic_target, "critic_target"),
                            (actor_optimizer, "actor_optimizer"), (critic_optimizer, "critic_optimizer"),
                            (alpha_optimizer, "alpha_optimizer"), (rb, "replay_buffer")]:
            load_state(module, resume[key], resume_path)
        with torch.no_grad():
            log_alpha.copy_(resume["log_alpha"])
        alpha = log_alpha.exp().item()
        start_vector_step, grad_steps, last_eval = resume["vector_step"], resume["gradient_steps"], resume["last_eval"]
        print(f"resuming {run_dir} from global step {resume['global_step']}", flush=True)

    # Planner demonstrations, through the same envs, before any learning
    obs, _ = envs.reset(seed=args.seed + start_vector_step)
    rb.start(obs)
    resetting = np.zeros(args.num_envs, dtype=bool)
    demo_episodes, demo_transitions = 0, 0
    while demo_episodes < args.num_demos and resume is None:
        actions = np.stack(envs.unwrapped.call("expert_action")).astype(np.float32)
        obs, rewards, terminations, truncations, infos = envs.step(actions)
        rb.add(actions, rewards, terminations, ~resetting, np.ones(args.num_envs, bool), obs)
        demo_transitions += int((~resetting).sum())
        demo_episodes += int(np.logical_or(terminations, truncations).sum())
        resetting = np.logical_or(terminations, truncations)
    if args.num_demos and resume is None:
        obs, _ = envs.reset()
        rb.start(obs)
        resetting[:] = False
        print(f"{demo_episodes} demo episodes: {demo_transitions} transitions in the buffer", flush=True)

    # TRY NOT TO MODIFY: start the game
    start_time = time.time()
    last_progress, last_success = start_time, float("nan")
    update_time, num_vector_steps = 0.0, args.total_timesteps // args.num_envs
    global_step = start_global_step = start_vector_step * args.num_envs
    start_grad_steps = grad_steps
    if resume is not None:
        set_rng_state(resume["rng"])  # last: building the networks and resetting the envs drew random numbers
    stop, clock = StopSignal(), CheckpointClock(args.checkpoint_minutes)
    for vector_step in range(start_vector_step, num_vector_steps):
        if stop.requested or clock.due():  # here `vector_step` steps are done; networks are in train mode
            save_resume(run_dir, SCRIPT, args, vector_step=vector_step, global_step=global_step,
                        gradient_steps=grad_steps, last_eval=last_eval, actor=actor.state_dict(),
                        critic=critic.state_dict(), critic_target=critic_target.state_dict(),
                        actor_optimizer=actor_optimizer.state_dict(), critic_optimizer=critic_optimizer.state_dict(),
                        alpha_optimizer=alpha_optimizer.state_dict(), log_alpha=log_alpha.detach().cpu(),
                        replay_buffer=rb.state_dict())
            if stop.requested:
                envs.close()
                writer.close()
                stop_for_requeue(stop)
        global_step += args.num_envs
        # ALGO LOGIC: put action logic here (train mode, no_grad: escnn builds fresh filters from current weights)
        with torch.no_grad():
            mean, log_std = actor(obs_to_tensor(obs, device))
            actions = sample_action(mean, log_std)[0].cpu().numpy()

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
            data = augment(rb.sample(args.batch_size, device), args.aug_copies)
            for key in ("obs", "next_obs"):  # channels-last images: 15-30% faster convolutions (measured on CPU)
                data[key] = data[key].contiguous(memory_format=torch.channels_last)
            grad_steps += 1

            # Critic: one encoder pass over s feeds both Q heads; the target uses the target critic, no grad.
            with torch.no_grad():
                next_mean, next_log_std = actor(data["next_obs"])
                next_actions, next_log_pi = sample_action(next_mean, next_log_std)
                qf1_next, qf2_next = critic_target(data["next_obs"], next_actions)
                min_qf_next = torch.min(qf1_next, qf2_next) - alpha * next_log_pi
                next_q_value = data["rewards"] + (1 - data["terminated"]) * args.gamma * min_qf_next
            features = critic.encode(data["obs"])
            qf1_a_values, qf2_a_values = critic.q_values(features, data["actions"])
            qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
            qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
            qf_loss = qf1_loss + qf2_loss
            critic_optimizer.zero_grad()
            qf_loss.backward()
            critic_optimizer.step()

            # Actor. The critic's encoder output for s is reused (detached: the actor loss must not train the
            # critic, and no gradient needs to pass back through the encoder, since it does not see the action);
            # only the two small Q heads run again, with the just-updated weights.
            mean, log_std = actor(data["obs"])
            pi, log_pi = sample_action(mean, log_std)
            qf1_pi, qf2_pi = critic.q_values(features.detach(), pi)
            actor_loss = (alpha * log_pi - torch.min(qf1_pi, qf2_pi)).mean()
            demo_loss = torch.zeros((), device=device)
            if args.demo_loss_weight > 0 and data["expert"].any():  # SACfD: imitate the planner on demo samples
                expert = data["expert"]
                demo_loss = F.mse_loss(pi[expert], data["actions"][expert])
                actor_loss = actor_loss + args.demo_loss_weight * demo_loss
            caps_temporal = caps_spatial = torch.zeros((), device=device)
            if args.caps_temporal_weight > 0 or args.caps_spatial_weight > 0:
                caps_temporal, caps_spatial = caps_terms(actor, data["obs"], data["next_obs"], args.caps_sigma, mean)
                caps_loss = args.caps_temporal_weight * caps_temporal + args.caps_spatial_weight * caps_spatial
                actor_loss = actor_loss + caps_loss
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()

            if args.autotune:
                alpha_loss = (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()
                alpha_optimizer.zero_grad()
                alpha_loss.backward()
                alpha_optimizer.step()
                alpha = log_alpha.exp().item()

            # update the target network
            with torch.no_grad():
                for param, target_param in zip(critic.parameters(), critic_target.parameters()):
                    target_param.lerp_(param, args.tau)
        update_time += time.time() - update_start

        if grad_steps % args.log_frequency < args.updates_per_step:
            writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
            writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
            writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
            writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
            writer.add_scalar("losses/demo_loss", demo_loss.item(), global_step)
            writer.add_scalar("losses/caps_temporal", caps_temporal.item(), global_step)
            writer.add_scalar("losses/caps_spatial", caps_spatial.item(), global_step)
            writer.add_scalar("losses/alpha", alpha, global_step)
            if args.autotune:
                writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
            elapsed = time.time() - start_time  # since this process started (a resumed run counts from there)
            writer.add_scalar("charts/SPS", int((global_step - start_global_step) / elapsed), global_step)
            writer.add_scalar("charts/updates_per_second", (grad_steps - start_grad_steps) / max(update_time, 1e-9),
                              global_step)
            writer.add_scalar("charts/gradient_steps", grad_steps, global_step)

        final = vector_step == num_vector_steps - 1
        if grad_steps % args.eval_frequency < args.updates_per_step or final:
            if last_eval != grad_steps:
                last_eval = grad_steps
                result = evaluate(actor, args, device, seed=args.seed + 10_000 + grad_steps)
                for key, value in result.items():
                    writer.add_scalar(f"eval/{key}", value, global_step)
                writer.add_scalar("eval/gradient_steps", grad_steps, global_step)
                last_success = result["success_rate"]
                print(f"eval @ {grad_steps} gradient steps: {format_eval(result)}", flush=True)
        if time.time() - last_progress > args.progress_interval or final:
            last_progress = time.time()
            sps = (global_step - start_global_step) / (time.time() - start_time)
            print(f"step {global_step}/{num_vector_steps * args.num_envs} | {grad_steps} gradient steps | "
                  f"SPS {sps:.1f} | updates/s {(grad_steps - start_grad_steps) / max(update_time, 1e-9):.2f} | "
                  f"last eval success {last_success:.2f} | "
                  f"{(num_vector_steps * args.num_envs - global_step) / max(sps, 1e-9) / 60:.1f} min left",
                  flush=True)

    envs.close()
    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        # escnn: saved in train mode, so the state_dicts hold parameters only (no cached filters)
        save_checkpoint(model_path, SCRIPT, args, actor=actor.state_dict(), critic=critic.state_dict(),
                        critic_target=critic_target.state_dict(), log_alpha=log_alpha.detach().cpu(),
                        global_step=global_step, gradient_steps=grad_steps)
        print(f"model saved to {model_path}", flush=True)
        result = evaluate(actor, args, device, seed=args.seed + 10_000,
                          video_folder=f"videos/{run_name}-eval" if args.capture_video else None)
        print(f"checkpoint eval: {format_eval(result)} over {args.eval_episodes} episodes", flush=True)

    writer.close()
