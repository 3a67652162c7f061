"""PPO on Atari with a mirror-equivariant actor-critic (escnn): `ppo_atari.py` with the game's symmetry built in.

Proximal Policy Optimization (Schulman et al. 2017, arXiv 1707.06347) with the details of "The 37 Implementation
Details of PPO" (Huang et al. 2022): GAE, per-minibatch advantage normalisation, clipped value loss, global
gradient clipping, annealed learning rate. Many Atari games look equally valid in a mirror once the mirrored
actions are swapped (Breakout: left-right, LEFT<->RIGHT; Pong: top-bottom, up<->down). A shared trunk of regular
fields of the reflection group makes the policy equivariant, pi(a | mirror(s)) = pi(swap(a) | s), and the value
invariant, V(mirror(s)) = V(s), so the whole PPO objective is invariant to the mirror (van der Pol et al. 2020;
Wang et al. 2023 on "extrinsic" symmetries such as score digits that break it a little).
`diff ppo_atari.py ppo_atari_equi.py` shows only the network and the symmetry.

    uv run python ppo_atari_equi.py --env-id BreakoutNoFrameskip-v4 --total-timesteps 10000000
    uv run python ppo_atari_equi.py --eval-checkpoint runs/<run>/ppo_atari_equi.cleanrl_model --eval-episodes 10
"""

import os
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.checkpoints import load_checkpoint, load_state, saved_weights  # PLUMBING
from cleanrl_equi.compile import (channels_last, check_compile_flags, compiled, prepare_optimizer,  # SPEED
                                  set_learning_rate, with_bf16_autocast)
from cleanrl_equi.envs.atari import action_meanings, make_atari_envs, mirror_symmetry, playfield_symmetry
from cleanrl_equi.equivariant import EscnnModule, TensorToField, discrete_action_type, enn, mirror_gspace
from cleanrl_equi.equivariant import plain_copy, refresh  # SPEED
from cleanrl_equi.traceable import through_traced  # SPEED
from cleanrl_equi.errors import fail, require
from cleanrl_equi.run import Run, device_for  # PLUMBING

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
    """whether to capture videos of the agent performances (check out `videos` folder); uses the gym back-end"""
    save_model: bool = False
    """whether to save the model to `runs/{run_name}` at the end, then evaluate it"""
    eval_checkpoint: Optional[str] = None  # PLUMBING
    """evaluate this saved model (a `.cleanrl_model` file) for `eval_episodes` games instead of training"""
    eval_episodes: int = 10
    """the number of full games played by the evaluation"""
    run_name: Optional[str] = None  # PLUMBING
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0  # PLUMBING
    """write the resume file runs/{run_name}/resume.pt every this many minutes of wall time (0 = only when a USR1/TERM signal says the job is about to stop)"""

    # Algorithm specific arguments
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the environment: <Game>NoFrameskip-v4, or ALE/<Game>-v5 for sticky actions"""
    env_backend: Literal["ale", "gym"] = "ale"
    """`ale`: ale-py's native multi-threaded vector env; `gym`: CleanRL's wrappers in gymnasium's vector env"""
    trunk: Literal["channels", "params"] = "channels"
    """`channels`: as many channels as the Nature CNN (fewer parameters, about as fast); `params`: about as many
    parameters as the Nature CNN (wider, slower)"""
    async_envs: bool = False
    """with the gym back-end, run each env in its own process (gymnasium's AsyncVectorEnv)"""
    mirror_crop: bool = True
    """crop each screen symmetrically about the game's measured mirror axis before the resize, so that
    flipping the 84x84 frame is the game's mirror (`--no-mirror-crop`: the whole screen, mirrored about its centre)"""
    total_timesteps: int = 10000000
    """total timesteps of the experiments"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 8
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold (stop the epochs of an update early once it is passed)"""
    progress_interval: float = 30.0  # PLUMBING
    """seconds between progress lines on stdout"""
    compile: bool = False  # SPEED
    """torch.compile the acting step and the update step (loss, backward, optimizer step): the same algorithm"""
    cudagraphs: bool = False  # SPEED
    """like --compile, and replay each step as a recorded CUDA graph (torch.compile "reduce-overhead" mode; GPU only)"""
    bf16: bool = False  # SPEED
    """run the network's forward passes in bfloat16 mixed precision (torch.autocast; weights, optimizer state,
    log-probabilities and losses stay float32); CPUs with AVX512-BF16/AMX and recent GPUs"""
    channels_last: bool = True  # SPEED
    """feed the update's minibatches to the convolutions in channels-last memory order (the same numbers, a faster
    convolution kernel on CPUs)"""

    # to be filled in runtime
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence, on settings that cannot work."""
    try:
        mirror_symmetry(args.env_id)
    except ValueError as exc:
        fail(str(exc))
    if args.mirror_crop:
        try:
            playfield_symmetry(args.env_id)
        except ValueError as exc:
            fail(f"--mirror-crop: {exc}")
    require(args, positive=("learning_rate",), fractions=("gamma", "gae_lambda"),
            non_negative=("clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "target_kl"),
            at_least_one=("num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes"))
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches != 0:
        fail(f"the batch of {args.num_envs} envs x {args.num_steps} steps = {batch_size} does not split into "
             f"{args.num_minibatches} minibatches; choose --num-minibatches dividing {batch_size}.")
    if args.total_timesteps < batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {batch_size} steps.")
    check_compile_flags(args, device_for(args))  # SPEED


# Regular fields per layer (each is 2 channels: the feature and its mirror image). "channels" keeps the Nature
# CNN's 32/64/64/512 channels; "params" widens by about 2.3x to reach its ~1.7M parameters (equivariant kernels
# are constrained: a channel-matched trunk has about 5x fewer free parameters).
TRUNK_FIELDS = {"channels": (16, 32, 32, 256), "params": (36, 72, 72, 600)}


class Agent(EscnnModule):
    """Nature-CNN-shaped actor-critic whose every layer commutes with the mirror (escnn R2Conv on regular fields).

    The 7x7 "fully connected" layer is an R2Conv whose kernel covers the whole map, because flattening a feature
    map and applying nn.Linear would forget how the mirror acts. The policy head maps to trivial fields for
    self-mirrored actions and one regular field per swapped pair (equivariant logits); the value head maps to one
    trivial field (invariant value).
    """

    def __init__(self, args: Args):
        super().__init__()
        symmetry, meanings = mirror_symmetry(args.env_id), action_meanings(args.env_id)
        gspace = mirror_gspace(symmetry.axis)
        # a grayscale frame is a scalar image: the mirror moves its pixels and changes nothing else
        frames_type = enn.FieldType(gspace, 4 * [gspace.trivial_repr])
        h1, h2, h3, h4 = [enn.FieldType(gspace, n * [gspace.regular_repr]) for n in TRUNK_FIELDS[args.trunk]]
        self.input = TensorToField(frames_type)
        self.network = enn.SequentialModule(
            enn.R2Conv(frames_type, h1, 8, stride=4),
            enn.ReLU(h1),
            enn.R2Conv(h1, h2, 4, stride=2),
            enn.ReLU(h2),
            enn.R2Conv(h2, h3, 3, stride=1),
            enn.ReLU(h3),
            enn.R2Conv(h3, h4, 7),
            enn.ReLU(h4),
        )
        action_type, self.action_order = discrete_action_type(gspace, symmetry.action_permutation(meanings))
        self.actor = enn.R2Conv(h4, action_type, 1)
        self.critic = enn.R2Conv(h4, enn.FieldType(gspace, [gspace.trivial_repr]), 1)
        with torch.no_grad():  # a near-uniform initial policy, as CleanRL's orthogonal init with std 0.01 gives
            self.actor.weights.mul_(0.01)

    def get_value(self, x):
        return self.critic(self.network(self.input(x / 255.0))).tensor.flatten(1)

    def get_action_and_value(self, x, action=None):
        hidden = self.network(self.input(x / 255.0))
        # float32 under --bf16 too: PPO's ratio compares log-probabilities
        logits = self.actor(hidden).tensor.flatten(1)[:, self.action_order].float()
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden).tensor.flatten(1).float()


def update_step(agent: Agent, optimizer, args: Args, obs, actions, logprobs, advantages, returns, values) -> dict:
    """One gradient step of the clipped PPO loss on a minibatch (loss, backward, optimizer step, in one function so
    that `--compile` compiles all of it); returns the statistics as detached tensors (no host sync)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions)
    logratio = newlogprob - logprobs
    ratio = logratio.exp()

    with torch.no_grad():
        # calculate approx_kl http://joschu.net/blog/kl-approx.html
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

    mb_advantages = advantages
    if args.norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

    # Policy loss
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # Value loss
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - returns) ** 2
        v_clipped = values + torch.clamp(newvalue - values, -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    return {"value_loss": v_loss.detach(), "policy_loss": pg_loss.detach(), "entropy": entropy_loss.detach(),
            "old_approx_kl": old_approx_kl, "approx_kl": approx_kl, "clipfrac": clipfrac}


def evaluate(agent: Agent, args: Args, device: torch.device, run_name: str, capture_video: bool = False) -> list[float]:
    """Play `args.eval_episodes` full games with actions sampled from the policy; print and return their raw scores."""
    envs = make_atari_envs(args.env_id, min(args.eval_episodes, 8), "gym" if capture_video else args.env_backend,
                           capture_video, f"{run_name}-eval", playfield_crop=args.mirror_crop)
    obs, _ = envs.reset(seed=args.seed + 10_000)
    torch.manual_seed(args.seed + 10_000)  # the sampled actions repeat too, not only the games' starts
    agent.eval()
    scores: list[float] = []
    while len(scores) < args.eval_episodes:
        with torch.no_grad():
            actions, _, _, _ = agent.get_action_and_value(torch.as_tensor(obs, device=device))
        obs, _, _, _, infos = envs.step(actions.cpu().numpy())
        for i in np.flatnonzero(infos.get("_episode", []))[: args.eval_episodes - len(scores)]:
            scores.append(float(infos["episode"]["r"][i]))
            print(f"eval game {len(scores) - 1}: score {scores[-1]:.1f}, {int(infos['episode']['l'][i])} frames")
    envs.close()
    print(f"{args.env_id}: mean score {np.mean(scores):.1f} +- {np.std(scores):.1f} over {len(scores)} games "
          f"(actions sampled from the policy, evaluation seed {args.seed + 10_000})", flush=True)
    return scores


def run_evaluation(args: Args) -> None:  # PLUMBING: --eval-checkpoint
    """The `--eval-checkpoint` path: rebuild the saved agent and report its mean score."""
    require(args, at_least_one=("eval_episodes",))
    checkpoint = load_checkpoint(args.eval_checkpoint, SCRIPT)
    saved = Args(**{k: v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__})
    saved.eval_episodes, saved.seed, saved.env_backend = args.eval_episodes, args.seed, args.env_backend
    agent = Agent(saved).to(device := device_for(args))
    load_state(agent, saved_weights(checkpoint, "model", args.eval_checkpoint, in_resume="agent"), args.eval_checkpoint)
    run_name = f"{saved.env_id}__{saved.exp_name}__{saved.seed}__{int(time.time())}"
    evaluate(agent, saved, device, run_name, capture_video=args.capture_video)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:  # PLUMBING: evaluate a saved model instead of training
        run_evaluation(args)
        raise SystemExit(0)
    check_args(args)
    if args.capture_video and args.env_backend == "ale":
        print("--capture-video records through gymnasium's wrappers: using --env-backend gym")
        args.env_backend = "gym"
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run = Run(SCRIPT, args, run_name)  # PLUMBING: --run-name or SLURM's; wandb, resume file, signals
    run_name = run.name  # PLUMBING
    writer = SummaryWriter(f"runs/{run_name}")
    run.attach(writer)  # PLUMBING: a resumed run's curves continue where its resume file left them

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.distributions.Distribution.set_default_validate_args(False)  # SPEED: Categorical's checks sync every step

    # env setup
    envs = make_atari_envs(args.env_id, args.num_envs, args.env_backend, args.capture_video, run_name, args.async_envs,
                           playfield_crop=args.mirror_crop)

    agent = Agent(args).to(device)
    print(f"agent: {sum(p.numel() for p in agent.parameters()):,} parameters", flush=True)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    acting_agent = agent
    acting_agent = plain_copy(agent) if args.compile else agent  # SPEED: a plain-torch copy (dynamo cannot trace escnn)
    policy, update = acting_agent.get_action_and_value, update_step
    prepare_optimizer(optimizer, args, device)  # SPEED: the learning rate and Adam's step counts as device tensors
    policy, update = [compiled(with_bf16_autocast(step, args, device), args) for step in (policy, update)]  # SPEED
    update = through_traced(update, agent) if args.compile else update  # SPEED: escnn layers as traceable torch

    # ALGO Logic: Storage setup (frames stay uint8 until the network scales them: 4x less memory for big rollouts)
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape, dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration, last_return = 0, 1, float("nan")
    run.keep(agent=agent, optimizer=optimizer)  # PLUMBING: what a resumed run continues from
    counters = run.resume(global_step=global_step, iteration=start_iteration - 1)  # PLUMBING: the saved step and RNG
    global_step, start_iteration = counters["global_step"], counters["iteration"] + 1  # PLUMBING
    start_time, start_step = time.time(), global_step
    if global_step == 0:  # a new run (a resumed one logged its hyperparameters when it started)
        rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    next_obs, _ = envs.reset(seed=args.seed + args.num_envs * (start_iteration - 1))  # a resumed run: new games
    next_obs = torch.as_tensor(next_obs, device=device)
    next_done = torch.zeros(args.num_envs).to(device)

    for iteration in range(start_iteration, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow
            set_learning_rate(optimizer, lrnow, args)  # SPEED: the compiled step's tensor, changed in place
        refresh(acting_agent, agent)  # SPEED: the plain copy takes the updated weights

        agent.eval()  # acting, no update until the rollout is done
        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value = policy(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device).view(-1)
            next_obs, next_done = torch.as_tensor(next_obs, device=device), torch.Tensor(next_done).to(device)

            if "_episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    last_return = float(infos["episode"]["r"][i])
                    writer.add_scalar("charts/episodic_return", last_return, global_step)
                    writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values

        batch = dict(obs=obs, actions=actions, logprobs=logprobs, advantages=advantages, returns=returns, values=values)
        batch = {key: value.flatten(0, 1) for key, value in batch.items()}  # flatten the batch: (step, env) -> sample

        # Optimizing the policy and value network
        agent.train()
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            device_inds = torch.as_tensor(b_inds, device=device)  # SPEED: one index copy per epoch, not per key
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]
                mb_inds = device_inds[start:end]  # SPEED: indexing with a NumPy array copies it to the device
                minibatch = {key: value[mb_inds] for key, value in batch.items()}
                minibatch = channels_last(minibatch, keys=("obs",)) if args.channels_last else minibatch  # SPEED
                stats = update(agent, optimizer, args, **minibatch)
                clipfracs.append(stats["clipfrac"])

            if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
                break

        y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        stats["clipfrac"] = torch.stack(clipfracs).mean()  # over every minibatch; the other statistics: the last one
        writer.add_scalar("charts/learning_rate", float(optimizer.param_groups[0]["lr"]), global_step)
        for key, value in stats.items():
            writer.add_scalar(f"losses/{key}", value.item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)
        run.progress(global_step, args.num_iterations * args.batch_size, f"last return {last_return:.1f}",  # PLUMBING
                     force=iteration == args.num_iterations)
        run.checkpoint(global_step=global_step, iteration=iteration)  # PLUMBING: periodic resume file; stop on signal

    envs.close()
    if args.save_model:
        run.save_model(model=agent.state_dict(), global_step=global_step)  # PLUMBING: with the script's name and args
        episodic_returns = evaluate(agent, args, device, run_name, capture_video=args.capture_video)
        for idx, episodic_return in enumerate(episodic_returns):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)

    run.finish(global_step=global_step, iteration=max(counters["iteration"], args.num_iterations))  # PLUMBING
    writer.close()
