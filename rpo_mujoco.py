"""RPO on MuJoCo: PPO for continuous control whose update step perturbs the Gaussian mean with uniform noise.

Robust Policy Optimization (Rahman & Xue 2022, arXiv 2212.07536) keeps PPO unchanged except in the update: before
the log-probability of a stored action is recomputed, the policy mean is shifted by noise drawn from
U(-rpo_alpha, rpo_alpha), which keeps the policy's entropy from collapsing. This is CleanRL's
`rpo_continuous_action.py` (its defaults, wrappers, names and order) on the gymnasium 1.x MuJoCo `-v5` tasks, with
three additions: the observation and reward normalisation statistics are saved with the model and restored (frozen)
when a saved policy is evaluated; a time-limit cut bootstraps from the value of the final observation; and runs
resume after a SLURM requeue.

    uv run python rpo_mujoco.py --env-id Hopper-v5 --rpo-alpha 0.01 --total-timesteps 1000000 --save-model
    uv run python rpo_mujoco.py --eval-checkpoint runs/<run_name>/rpo_mujoco.cleanrl_model --eval-episodes 10
"""

import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.normal import Normal
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.checkpoints import load_checkpoint, load_state, saved_weights  # PLUMBING
from cleanrl_equi.compile import check_compile_flags, compiled, prepare_optimizer, set_learning_rate  # SPEED
from cleanrl_equi.envs.mujoco import (NormalizationState, check_env_id, check_rendering, evaluate_policy,
                                      saved_statistics, training_statistics)
from cleanrl_equi.errors import fail, require
from cleanrl_equi.run import Run, device_for, new_folder  # PLUMBING

SCRIPT = os.path.basename(__file__)[: -len(".py")]


@dataclass
class Args:
    exp_name: str = SCRIPT
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, the envs and the evaluation episodes)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available (for these small MLPs the CPU is often as fast)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanrl-equi"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of sub-env 0 (check out `videos` folder; headless Linux renders through EGL)"""
    save_model: bool = False
    """whether to save the model and its normalisation statistics to `runs/{run_name}` at the end, then evaluate it"""
    eval_checkpoint: Optional[str] = None  # PLUMBING
    """evaluate this saved model (a `.cleanrl_model` file) for `eval_episodes` episodes instead of training"""
    eval_episodes: int = 10
    """episodes per evaluation (deterministic mean action, frozen normalisation statistics)"""
    run_name: Optional[str] = None  # PLUMBING
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it
    holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0  # PLUMBING
    """write the resume file runs/{run_name}/resume.pt every this many minutes (0 = only on a USR1/TERM signal)"""
    progress_interval: float = 30.0  # PLUMBING
    """seconds between progress lines on stdout"""
    compile: bool = False  # SPEED
    """torch.compile the acting step and the update step (loss, backward, optimizer step): the same algorithm"""
    cudagraphs: bool = False  # SPEED
    """like --compile, and replay each step as a recorded CUDA graph (torch.compile "reduce-overhead" mode; GPU only)"""

    # Algorithm specific arguments
    env_id: str = "HalfCheetah-v5"
    """the id of the environment: a gymnasium MuJoCo task"""
    total_timesteps: int = 8000000
    """total timesteps of the experiments (rounded down to whole rollouts)"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_envs: int = 1
    """the number of parallel game environments"""
    num_steps: int = 2048
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma (also used by the reward normaliser)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 32
    """the number of mini-batches"""
    update_epochs: int = 10
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.0
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold (stop the epochs of an update early once it is passed)"""
    rpo_alpha: float = 0.5
    """the alpha parameter for RPO (noise half-width; CleanRL: 0.01 for Ant, Hopper, Reacher, Pusher, IDP)"""
    bootstrap_truncated: bool = True
    """bootstrap from the value of the final observation when the time limit cuts an episode (CleanRL does not)"""

    # to be filled in runtime
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence naming the fix, on any flag combination that cannot work."""
    require(args, at_least_one=("eval_episodes",))
    if args.eval_checkpoint is not None:  # PLUMBING: evaluation takes the env and the network from the checkpoint
        return
    check_env_id(args.env_id)
    require(args, positive=("learning_rate",), fractions=("gamma", "gae_lambda"),
            non_negative=("clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "target_kl", "rpo_alpha"),
            at_least_one=("num_envs", "num_steps", "num_minibatches", "update_epochs"))
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches != 0:
        fail(f"the batch of --num-envs x --num-steps = {batch_size} steps does not split into --num-minibatches "
             f"{args.num_minibatches} equal parts; choose a number of minibatches that divides {batch_size}.")
    if args.total_timesteps < batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {batch_size} steps; raise it.")
    check_compile_flags(args, device_for(args))  # SPEED
    if args.capture_video:
        check_rendering(args.env_id)


def make_env(env_id, idx, capture_video, video_dir, gamma, video_episodes=None):
    """CleanRL's continuous-control wrappers (innermost first); with `video_episodes`, sub-env 0 records the first
    that many episodes (evaluation) instead of gymnasium's default schedule 0, 1, 8, 27, ..., 1000, 2000, ..."""

    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            trigger = None if video_episodes is None else (lambda episode: episode < video_episodes)
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=trigger)
        else:
            env = gym.make(env_id)
        env = gym.wrappers.FlattenObservation(env)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # inside the normalisers: logged returns are the task's own
        env = gym.wrappers.ClipAction(env)
        env = gym.wrappers.NormalizeObservation(env)
        clipped_space = gym.spaces.Box(-10.0, 10.0, env.observation_space.shape, np.float32)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), clipped_space)
        env = gym.wrappers.NormalizeReward(env, gamma=gamma)
        env = gym.wrappers.TransformReward(env, lambda reward: np.clip(reward, -10, 10))
        return env

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, rpo_alpha: float):
        super().__init__()
        self.rpo_alpha = rpo_alpha
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, action_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.zeros(1, action_dim))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        action_mean = self.actor_mean(x)
        action_std = torch.exp(self.actor_logstd.expand_as(action_mean))
        if action is None:
            action = Normal(action_mean, action_std).sample()
        else:  # RPO: score the stored action under a mean moved by fresh U(-alpha, alpha) noise
            action_mean = action_mean + torch.empty_like(action_mean).uniform_(-self.rpo_alpha, self.rpo_alpha)
        probs = Normal(action_mean, action_std)
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


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


def truncation_bootstrap(agent: Agent, infos: dict, terminations, truncations, gamma: float, device) -> np.ndarray:
    """gamma * V(final observation) for each sub-env whose episode the time limit cut off, 0 for all others.

    With same-step autoreset the observation returned for such an env is already the first of its next episode, so
    the value of the state where the episode was cut comes from `infos["final_obs"]`. Added to the last reward, it
    lets GAE treat the cut as an episode end while keeping the value of the unfinished future; an env that
    terminated in the same step gets nothing, since termination means there is no future.
    """
    bonus = np.zeros(len(truncations), dtype=np.float32)
    cut = np.flatnonzero(np.logical_and(truncations, np.logical_not(terminations)))
    if len(cut) > 0:
        final_obs = torch.as_tensor(np.stack([infos["final_obs"][i] for i in cut]), dtype=torch.float32, device=device)
        with torch.no_grad():
            bonus[cut] = gamma * agent.get_value(final_obs).flatten().cpu().numpy()
    return bonus


def evaluate(agent: Agent, env_id: str, statistics: dict, episodes: int, seed: int, gamma: float, device,
             video_dir: Optional[str] = None) -> tuple[list[float], list[int]]:
    """Returns and lengths of `episodes` episodes of the deterministic mean action, in this script's wrappers behind
    the saved, frozen normalisation statistics (same inputs, same episodes)."""
    env = make_env(env_id, 0, video_dir is not None, video_dir, gamma, episodes)
    return evaluate_policy(agent.actor_mean, env, statistics, episodes, seed, device)


def load_policy(path: str, device) -> tuple[Agent, dict, dict]:  # PLUMBING: --eval-checkpoint
    """The agent and normalisation statistics of a model file or a resume file written by this script (a resume file
    keeps each sub-env's statistics: they are merged as --save-model merges them), failing with one sentence."""
    checkpoint = load_checkpoint(path, SCRIPT, map_location=device)
    statistics, saved = saved_statistics(checkpoint, path), checkpoint["args"]
    weights = saved_weights(checkpoint, "model", path, in_resume="agent")
    check_env_id(saved["env_id"])
    agent = Agent(weights["critic.0.weight"].shape[1], weights["actor_logstd"].shape[1], saved["rpo_alpha"])
    load_state(agent, weights, path)
    return agent.to(device), statistics, saved


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.eval_checkpoint is not None:  # PLUMBING: evaluate a saved model instead of training
        agent, statistics, saved = load_policy(args.eval_checkpoint, device_for(args))
        run_dir = os.path.basename(os.path.dirname(os.path.abspath(args.eval_checkpoint)))
        video_dir = new_folder(f"videos/{run_dir}-eval")
        if args.capture_video:
            check_rendering(saved["env_id"])
            print(f"videos of the {args.eval_episodes} episodes in {video_dir}", flush=True)
        print(f"evaluating {args.eval_checkpoint} on {saved['env_id']} for {args.eval_episodes} episodes", flush=True)
        evaluate(agent, saved["env_id"], statistics, args.eval_episodes, args.seed + 10_000, saved["gamma"], device_for(args),
                 video_dir if args.capture_video else None)
        raise SystemExit(0)
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

    # env setup
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, f"videos/{run_name}", args.gamma)
                                     for i in range(args.num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    assert isinstance(envs.single_action_space, gym.spaces.Box), "only continuous action space is supported"
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    action_dim = int(np.prod(envs.single_action_space.shape))

    agent = Agent(obs_dim, action_dim, args.rpo_alpha).to(device)
    print(f"agent: {sum(p.numel() for p in agent.parameters()):,} parameters", flush=True)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    policy, update = agent.get_action_and_value, update_step
    prepare_optimizer(optimizer, args, device)  # SPEED: the learning rate and Adam's step counts as device tensors
    policy, update = compiled(policy, args), compiled(update, args)  # SPEED: torch.compile (README "Speed")

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration, last_return = 0, 1, float("nan")
    run.keep(agent=agent, optimizer=optimizer, normalization=NormalizationState(envs))  # PLUMBING: normalisers too
    counters = run.resume(global_step=global_step, iteration=start_iteration - 1)  # PLUMBING: the saved step and RNG
    global_step, start_iteration = counters["global_step"], counters["iteration"] + 1  # PLUMBING
    start_time, start_step = time.time(), global_step
    if global_step == 0:  # a new run (a resumed one logged its hyperparameters when it started)
        rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    next_obs, _ = envs.reset(seed=args.seed + args.num_envs * (start_iteration - 1))  # a resumed run: new episodes
    next_obs = torch.Tensor(next_obs).to(device)
    next_done = torch.zeros(args.num_envs).to(device)

    for iteration in range(start_iteration, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow
            set_learning_rate(optimizer, lrnow, args)  # SPEED: the compiled step's tensor, changed in place

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
            if args.bootstrap_truncated:
                reward = reward + truncation_bootstrap(agent, infos, terminations, truncations, args.gamma, device)
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device).view(-1)
            next_obs, next_done = torch.Tensor(next_obs).to(device), torch.Tensor(next_done).to(device)

            if "final_info" in infos and "_episode" in infos["final_info"]:
                for i in np.flatnonzero(infos["final_info"]["_episode"]):
                    last_return = float(infos["final_info"]["episode"]["r"][i])
                    writer.add_scalar("charts/episodic_return", last_return, global_step)
                    writer.add_scalar("charts/episodic_length", infos["final_info"]["episode"]["l"][i], global_step)

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
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]
                stats = update(agent, optimizer, args, **{key: value[mb_inds] for key, value in batch.items()})
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

    if args.save_model:  # the normalisation statistics, merged over the sub-envs, go with the weights
        statistics = training_statistics(envs)
        run.save_model(model=agent.state_dict(), **statistics, obs_dim=obs_dim, action_dim=action_dim,  # PLUMBING
                       global_step=global_step)
        eval_returns, _ = evaluate(agent, args.env_id, statistics, args.eval_episodes, args.seed + 10_000, args.gamma, device,
                                   f"videos/{run_name}-eval" if args.capture_video else None)
        for idx, episodic_return in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)

    envs.close()
    run.finish(global_step=global_step, iteration=max(counters["iteration"], args.num_iterations))  # PLUMBING
    writer.close()
