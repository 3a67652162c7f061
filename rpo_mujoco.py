"""RPO on MuJoCo: PPO for continuous control whose update step perturbs the Gaussian mean with uniform noise.

Robust Policy Optimization (Rahman & Xue, 2022, "Robust Policy Optimization in Deep Reinforcement Learning",
arXiv:2212.07536) keeps PPO unchanged except in the update: before the log-probability of a stored action is
recomputed, the policy mean is shifted by noise drawn from U(-rpo_alpha, rpo_alpha). The perturbed distribution
keeps the policy's entropy from collapsing. This file follows CleanRL's `rpo_continuous_action.py` (its defaults and
its wrappers) on the gymnasium 1.x MuJoCo `-v5` tasks, and adds what CleanRL lacks: the observation and reward
normalisation statistics are saved with the model, and a saved policy is evaluated with them restored and frozen.

Example (train, save, evaluate the saved policy):
    uv run python rpo_mujoco.py --env-id Hopper-v5 --rpo-alpha 0.01 --total-timesteps 1000000 --save-model
    uv run python rpo_mujoco.py --eval-checkpoint runs/<run_name>/rpo_mujoco.cleanrl_model --eval-episodes 10
"""

import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

# MuJoCo renders (for --capture-video) through OpenGL; a Linux machine without a display has no window system, so
# use EGL there (it needs the libegl1 package) unless the user chose a backend with MUJOCO_GL themselves.
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from gymnasium.vector import AutoresetMode
from torch.distributions.normal import Normal
from torch.utils.tensorboard import SummaryWriter

from cleanrl_equi.utils import (
    RESUME_FILE, CheckpointClock, StopSignal, fail, load_checkpoint, load_resume, load_state,
    make_run_name, save_checkpoint, save_resume, set_rng_state, stop_for_requeue,
)

SCRIPT = os.path.basename(__file__)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment; part of the run name (default: this file's stem)"""
    seed: int = 1
    """seed for python, numpy, torch and the envs (evaluation episodes are seeded with it too)"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic, so cuDNN picks deterministic algorithms"""
    cuda: bool = True
    """run the networks on the GPU when one is visible (for these small MLPs the CPU is often as fast)"""
    track: bool = False
    """log the run to Weights & Biases as well (wandb is imported only then)"""
    wandb_project_name: str = "cleanrl-equi"
    """Weights & Biases project of the run"""
    wandb_entity: Optional[str] = None
    """Weights & Biases team or user (default: your wandb default)"""
    capture_video: bool = False
    """record videos of sub-env 0 into videos/{run_name} (MuJoCo renders through OpenGL: EGL on headless Linux)"""
    save_model: bool = False
    """after training, save the network and the normalisation statistics to runs/{run_name} and evaluate them"""
    eval_checkpoint: Optional[str] = None
    """evaluate this saved model (a .cleanrl_model file written with --save-model) instead of training"""
    eval_episodes: int = 10
    """episodes per evaluation (deterministic mean action, frozen normalisation statistics)"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: {env}__{exp}__{seed}__{SLURM job id or unix time}); if it holds a resume file, training continues from it"""
    checkpoint_minutes: float = 30.0
    """write the resume file runs/{run_name}/resume.pt every this many minutes of wall time (0 = only when a USR1/TERM signal says the job is about to stop)"""

    # Algorithm specific arguments
    env_id: str = "HalfCheetah-v5"
    """gymnasium MuJoCo task to train on"""
    total_timesteps: int = 8000000
    """env steps of the run (rounded down to whole rollouts of num_envs x num_steps)"""
    learning_rate: float = 3e-4
    """Adam learning rate (its starting value when annealed)"""
    num_envs: int = 1
    """sub-envs stepped together in one synchronous vector env"""
    num_steps: int = 2048
    """steps each sub-env takes per rollout, before every update"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over the run"""
    gamma: float = 0.99
    """discount factor (also used by the reward normaliser)"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 32
    """minibatches each rollout is split into per epoch"""
    update_epochs: int = 10
    """passes over each rollout per update"""
    norm_adv: bool = True
    """standardise the advantages within each minibatch"""
    clip_coef: float = 0.2
    """PPO clip range of the probability ratio (also the value clip range)"""
    clip_vloss: bool = True
    """clip the value update around the rollout's value estimates"""
    ent_coef: float = 0.0
    """weight of the entropy bonus in the loss"""
    vf_coef: float = 0.5
    """weight of the value loss in the loss"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this value"""
    target_kl: Optional[float] = None
    """stop an update's epochs early once the approximate KL exceeds this (default: never)"""
    rpo_alpha: float = 0.5
    """half-width of RPO's U(-alpha, alpha) noise on the mean (CleanRL advises 0.01 for Ant, Hopper, Reacher, Pusher)"""
    bootstrap_truncated: bool = True
    """bootstrap from the value of the final observation when the time limit cuts an episode (CleanRL does not)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def check_env_id(env_id: str) -> None:
    """Stop with one sentence unless `env_id` names a gymnasium MuJoCo task this script can train on."""
    examples = "HalfCheetah-v5, Hopper-v5, Walker2d-v5, Ant-v5 or Humanoid-v5"
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id or _is_registered_atari(env_id):
        fail(f"{env_id} is an Atari game and this script trains MuJoCo tasks; use ppo_atari.py for Atari.")
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        fail(f"unknown env id {env_id!r}; pass a gymnasium MuJoCo task such as {examples}.")
    entry_point = spec.entry_point if isinstance(spec.entry_point, str) else ""
    if not entry_point.startswith("gymnasium.envs.mujoco."):
        if (spec.version or 0) < 4 and f"{spec.name}-v5" in gym.registry:
            fail(f"{env_id} needs mujoco-py, which gymnasium 1.x no longer supports; use {spec.name}-v5.")
        fail(f"{env_id} is not a MuJoCo continuous-control task; pass one such as {examples}.")


def _is_registered_atari(env_id: str) -> bool:
    """Whether `env_id` is one of the Atari ids that ale-py registers (only known after importing ale_py)."""
    if env_id in gym.registry:
        return "ale_py" in str(gym.registry[env_id].entry_point)
    try:
        import ale_py
    except ImportError:
        return False
    gym.register_envs(ale_py)
    return env_id in gym.registry and "ale_py" in str(gym.registry[env_id].entry_point)


def make_env(env_id: str, idx: int, capture_video: bool, video_dir: str, gamma: float,
             video_episodes: Optional[int] = None):
    """A thunk building one MuJoCo env with CleanRL's continuous-control wrappers (innermost first).

    With `capture_video`, sub-env 0 records episodes 0, 1, 8, 27, ..., 1000, 2000, ... (gymnasium's default
    schedule), or the first `video_episodes` episodes when that is given (evaluation).
    """

    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            trigger = None if video_episodes is None else (lambda episode: episode < video_episodes)
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=trigger)
        else:
            env = gym.make(env_id)
        env = gym.wrappers.FlattenObservation(env)
        # Episode statistics sit inside the normalisers, so the logged returns are the task's raw returns.
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = gym.wrappers.ClipAction(env)
        env = gym.wrappers.NormalizeObservation(env)
        clipped_space = gym.spaces.Box(-10.0, 10.0, env.observation_space.shape, np.float32)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10.0, 10.0), clipped_space)
        env = gym.wrappers.NormalizeReward(env, gamma=gamma)
        env = gym.wrappers.TransformReward(env, lambda reward: np.clip(reward, -10.0, 10.0))
        return env

    return thunk


def normalizers(env: gym.Env) -> tuple[gym.wrappers.NormalizeObservation, gym.wrappers.NormalizeReward]:
    """The observation and reward normalisation wrappers inside one sub-env built by `make_env`."""
    obs_norm = reward_norm = None
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.NormalizeObservation):
            obs_norm = env
        elif isinstance(env, gym.wrappers.NormalizeReward):
            reward_norm = env
        env = env.env
    assert obs_norm is not None and reward_norm is not None, "make_env must add both normalisation wrappers"
    return obs_norm, reward_norm


def merged_statistics(rms_list) -> dict:
    """Combine running mean/variance/count trackers (one per sub-env) into one, as if they had seen all the data."""
    mean = np.array(rms_list[0].mean, dtype=np.float64)
    var = np.array(rms_list[0].var, dtype=np.float64)
    count = float(rms_list[0].count)
    for rms in rms_list[1:]:
        total = count + rms.count
        delta = rms.mean - mean
        mean = mean + delta * rms.count / total
        var = (var * count + rms.var * rms.count + np.square(delta) * count * rms.count / total) / total
        count = total
    return {"mean": mean, "var": var, "count": count}


def training_statistics(envs: gym.vector.SyncVectorEnv) -> dict:
    """The normalisation statistics of all sub-envs, merged: what a saved policy needs to see as it saw in training."""
    pairs = [normalizers(env) for env in envs.envs]
    return {
        "obs_rms": merged_statistics([obs_norm.obs_rms for obs_norm, _ in pairs]),
        "return_rms": merged_statistics([reward_norm.return_rms for _, reward_norm in pairs]),
    }


def sub_env_statistics(envs: gym.vector.SyncVectorEnv) -> list[dict]:
    """The normalisation statistics of each sub-env, not merged: what a resumed run needs to go on as it was."""
    pairs = [normalizers(env) for env in envs.envs]
    return [
        {"obs_rms": merged_statistics([obs_norm.obs_rms]), "return_rms": merged_statistics([reward_norm.return_rms])}
        for obs_norm, reward_norm in pairs
    ]


def restore_statistics(env: gym.Env, statistics: dict, freeze: bool = True) -> None:
    """Load saved normalisation statistics into one sub-env; freeze them (evaluation) or let them go on (resume)."""
    obs_norm, reward_norm = normalizers(env)
    for rms, saved in ((obs_norm.obs_rms, statistics["obs_rms"]), (reward_norm.return_rms, statistics["return_rms"])):
        rms.mean = np.array(saved["mean"], dtype=rms.mean.dtype).reshape(rms.mean.shape)
        rms.var = np.array(saved["var"], dtype=rms.var.dtype).reshape(rms.var.shape)
        rms.count = float(saved["count"])
    obs_norm.update_running_mean = not freeze
    reward_norm.update_running_mean = not freeze


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std` and a constant bias (PPO's usual initialisation)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(inputs: int, outputs: int, output_std: float) -> nn.Sequential:
    """Two hidden tanh layers of 64 units; the last layer's gain sets the initial scale of the output."""
    return nn.Sequential(
        layer_init(nn.Linear(inputs, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, 64)),
        nn.Tanh(),
        layer_init(nn.Linear(64, outputs), std=output_std),
    )


class Agent(nn.Module):
    """Separate MLPs for the value and the Gaussian mean; the log-std is a free, state-independent vector."""

    def __init__(self, obs_dim: int, action_dim: int, rpo_alpha: float):
        super().__init__()
        self.rpo_alpha = rpo_alpha
        self.critic = mlp(obs_dim, 1, output_std=1.0)
        self.actor_mean = mlp(obs_dim, action_dim, output_std=0.01)  # near-zero initial means
        self.actor_logstd = nn.Parameter(torch.zeros(1, action_dim))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)

    def get_action_and_value(self, x: torch.Tensor, action: Optional[torch.Tensor] = None):
        """Sample an action (rollout) or score a stored one (update); also return log-prob, entropy and value.

        Scoring a stored action is where RPO differs from PPO: the mean is first moved by U(-alpha, alpha) noise,
        fresh for every call, so the update sees a policy of higher entropy than the one that acted.
        """
        mean = self.actor_mean(x)
        std = self.actor_logstd.exp().expand_as(mean)
        if action is None:
            action = Normal(mean, std).sample()
        else:
            mean = mean + torch.empty_like(mean).uniform_(-self.rpo_alpha, self.rpo_alpha)
        distribution = Normal(mean, std)
        log_prob = distribution.log_prob(action).sum(dim=1)  # independent action dimensions
        return action, log_prob, distribution.entropy().sum(dim=1), self.critic(x)


def truncation_bootstrap(agent: Agent, infos: dict, terminations, truncations, gamma: float, device) -> np.ndarray:
    """gamma * V(final observation) for each sub-env whose episode the time limit cut off, 0 for all others.

    With same-step autoreset the observation returned for such an env is already the first one of its next episode,
    so the value of the state where the episode was cut comes from `infos["final_obs"]`. Adding it to the last
    reward lets GAE treat the cut like an ordinary episode end while keeping the value of the unfinished future; an
    env that terminated (fell over) in the same step gets nothing, since termination means there is no future.
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
    """Returns and lengths of `episodes` episodes of the deterministic (mean) action, with frozen saved statistics.

    The env is seeded once with `seed` and then autoresets, so the same agent, statistics and seed always give the
    same episodes.
    """
    envs = gym.vector.SyncVectorEnv(
        [make_env(env_id, 0, video_dir is not None, video_dir or "", gamma, video_episodes=episodes)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    restore_statistics(envs.envs[0], statistics)
    obs, _ = envs.reset(seed=seed)
    returns, lengths = [], []
    while len(returns) < episodes:
        with torch.no_grad():
            action = agent.actor_mean(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "final_info" in infos and infos["final_info"].get("_episode", [False])[0]:
            returns.append(float(infos["final_info"]["episode"]["r"][0]))
            lengths.append(int(infos["final_info"]["episode"]["l"][0]))
    envs.close()
    return returns, lengths


def print_evaluation(returns: list[float], lengths: list[int], source: str) -> None:
    for i, (episodic_return, length) in enumerate(zip(returns, lengths, strict=True)):
        print(f"eval episode {i}: return {episodic_return:.6f}, length {length}")
    print(
        f"eval mean return over {len(returns)} episodes: {np.mean(returns):.6f} +- {np.std(returns):.6f} "
        f"(deterministic mean action, frozen normalisation statistics from {source})",
        flush=True,
    )


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def check_args(args: Args) -> None:
    """Stop at start-up, with one sentence naming the fix, on any flag combination that cannot work."""
    if args.eval_episodes < 1:
        fail(f"--eval-episodes must be at least 1 (got {args.eval_episodes}).")
    if args.eval_checkpoint is not None:
        return  # evaluation takes the env and the network from the checkpoint
    check_env_id(args.env_id)
    if args.num_envs < 1 or args.num_steps < 1:
        fail(f"--num-envs and --num-steps must be at least 1 (got {args.num_envs} and {args.num_steps}).")
    batch_size = args.num_envs * args.num_steps
    if args.num_minibatches < 1 or batch_size % args.num_minibatches != 0:
        fail(
            f"the batch of --num-envs x --num-steps = {batch_size} steps does not split into --num-minibatches "
            f"{args.num_minibatches} equal parts; choose a number of minibatches that divides {batch_size}."
        )
    if args.total_timesteps < batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {batch_size} steps; raise it.")
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        fail(f"--gamma and --gae-lambda must lie in [0, 1] (got {args.gamma} and {args.gae_lambda}).")
    if args.rpo_alpha < 0:
        fail(f"--rpo-alpha is the half-width of a uniform noise and must be >= 0 (got {args.rpo_alpha}).")
    if args.capture_video:
        check_rendering(args.env_id)


def check_rendering(env_id: str) -> None:
    """Render one frame, so a machine without a working OpenGL backend fails now rather than at the first video."""
    # torch loads triton (with its own LLVM) lazily, the first time an optimizer is built. Loaded after Mesa's
    # software EGL (which brings another LLVM), it crashes the process with a segmentation fault, so load it first.
    import torch._dynamo  # noqa: F401
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as exc:
        fail(
            f"--capture-video cannot render {env_id} with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
            f"({type(exc).__name__}); install EGL (Debian: libegl1 libgl1-mesa-dri) or OSMesa (libosmesa6) and set "
            f"MUJOCO_GL=egl or MUJOCO_GL=osmesa."
        )


def load_policy(path: str, device) -> tuple[Agent, dict, dict]:
    """The agent and normalisation statistics of a checkpoint written by this script, failing with one sentence."""
    checkpoint = load_checkpoint(path, SCRIPT, map_location=device)
    missing = [key for key in ("model", "obs_rms", "return_rms", "obs_dim", "action_dim") if key not in checkpoint]
    if missing:
        fail(f"checkpoint {path!r} lacks {', '.join(missing)}; re-train with --save-model to write a complete one.")
    saved_args = checkpoint["args"]
    check_env_id(saved_args["env_id"])
    agent = Agent(checkpoint["obs_dim"], checkpoint["action_dim"], saved_args["rpo_alpha"]).to(device)
    try:
        agent.load_state_dict(checkpoint["model"])
    except RuntimeError:
        fail(f"checkpoint {path!r} holds a network of another shape than rpo_mujoco.py builds; re-train it.")
    agent.eval()
    statistics = {"obs_rms": checkpoint["obs_rms"], "return_rms": checkpoint["return_rms"]}
    return agent, statistics, saved_args


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)

    # Seeding (the envs are seeded by their first reset below).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    if args.eval_checkpoint is not None:
        agent, statistics, saved_args = load_policy(args.eval_checkpoint, device)
        run_dir_name = os.path.basename(os.path.dirname(os.path.abspath(args.eval_checkpoint)))
        video_dir = f"videos/{run_dir_name}-eval" if args.capture_video else None
        if args.capture_video:
            check_rendering(saved_args["env_id"])
        env_id = saved_args["env_id"]
        print(f"evaluating {args.eval_checkpoint} on {env_id} for {args.eval_episodes} episodes", flush=True)
        returns, lengths = evaluate(
            agent, env_id, statistics, args.eval_episodes, args.seed, saved_args["gamma"], device, video_dir
        )
        print_evaluation(returns, lengths, args.eval_checkpoint)
        raise SystemExit(0)

    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_name = make_run_name(args.run_name, args.env_id, args.exp_name, args.seed)
    run_dir = f"runs/{run_name}"
    # A resume file in the run directory (a requeued SLURM job, or the same --run-name again): go on from it.
    # num_iterations follows --total-timesteps, which may be raised.
    resume = load_resume(run_dir, SCRIPT, args)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    # On resume, TensorBoard drops what the interrupted run logged after its resume file (steps > its global step).
    writer = SummaryWriter(run_dir, purge_step=resume["global_step"] + 1 if resume else None)
    if resume is None:
        rows = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    else:
        print(f"resuming {run_dir} from global step {resume['global_step']}", flush=True)

    # Same-step autoreset: when an episode ends, `step` already returns the first observation of the next one, and
    # the last observation and the episode statistics of the finished one arrive in infos["final_obs"/"final_info"].
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, i, args.capture_video, f"videos/{run_name}", args.gamma) for i in range(args.num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    assert isinstance(envs.single_action_space, gym.spaces.Box), "MuJoCo tasks have continuous (Box) actions"
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    action_dim = int(np.prod(envs.single_action_space.shape))

    agent = Agent(obs_dim, action_dim, args.rpo_alpha).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # Rollout storage. ended[t] = 1 when the episode ended with step t (terminated or truncated), so obs[t + 1]
    # (or next_obs after the last step) already belongs to a new episode and must not be bootstrapped from.
    rollout_shape = (args.num_steps, args.num_envs)
    obs = torch.zeros(rollout_shape + (obs_dim,), device=device)
    actions = torch.zeros(rollout_shape + (action_dim,), device=device)
    logprobs, rewards, ended, values = (torch.zeros(rollout_shape, device=device) for _ in range(4))

    global_step, start_iteration, env_seed = 0, 1, args.seed
    if resume is not None:
        resume_path = os.path.join(run_dir, RESUME_FILE)
        load_state(agent, resume["model"], resume_path)
        load_state(optimizer, resume["optimizer"], resume_path)
        global_step, start_iteration = resume["global_step"], resume["iteration"] + 1
        for env, statistics in zip(envs.envs, resume["normalization"], strict=True):
            restore_statistics(env, statistics, freeze=False)  # they go on updating, as in the interrupted run
        # The simulations are not saved: the resumed run starts fresh episodes, seeded from the seed and the
        # iteration so that they are not the episodes the run opened with.
        env_seed = args.seed + args.num_envs * start_iteration
        set_rng_state(resume["rng"])  # building the agent drew from torch's RNG: go on from the saved state
    stop = StopSignal()
    clock = CheckpointClock(args.checkpoint_minutes)

    start_step, start_time = global_step, time.time()  # SPS counts the steps of this process only
    last_progress = -float("inf")
    latest_return = float("nan")
    next_obs, _ = envs.reset(seed=env_seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)

    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:  # linear decay: the full rate in the first iteration, 1/num_iterations of it in the last
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - (iteration - 1) / args.num_iterations)

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            next_obs_np, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            reward = np.asarray(reward, dtype=np.float32)
            if args.bootstrap_truncated:
                reward = reward + truncation_bootstrap(agent, infos, terminations, truncations, args.gamma, device)
            rewards[step] = torch.as_tensor(reward, device=device)
            ended[step] = torch.as_tensor(np.logical_or(terminations, truncations), dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)

            if "final_info" in infos and "_episode" in infos["final_info"]:
                finished = infos["final_info"]
                for i in np.flatnonzero(finished["_episode"]):
                    latest_return = float(finished["episode"]["r"][i])
                    writer.add_scalar("charts/episodic_return", latest_return, global_step)
                    writer.add_scalar("charts/episodic_length", int(finished["episode"]["l"][i]), global_step)

        # Generalised advantage estimation, backwards through the rollout.
        with torch.no_grad():
            advantages = torch.zeros_like(rewards)
            last_gae = torch.zeros(args.num_envs, device=device)
            following_value = agent.get_value(next_obs).flatten()
            for t in reversed(range(args.num_steps)):
                if t < args.num_steps - 1:
                    following_value = values[t + 1]
                continues = 1.0 - ended[t]
                delta = rewards[t] + args.gamma * following_value * continues - values[t]
                last_gae = delta + args.gamma * args.gae_lambda * continues * last_gae
                advantages[t] = last_gae
            returns = advantages + values

        # One update: several epochs over the rollout, flattened to (num_steps * num_envs, ...), in minibatches.
        flat_obs = obs.reshape(-1, obs_dim)
        flat_actions = actions.reshape(-1, action_dim)
        flat_logprobs = logprobs.reshape(-1)
        flat_advantages = advantages.reshape(-1)
        flat_returns = returns.reshape(-1)
        flat_values = values.reshape(-1)
        clipped_fractions = []
        for _epoch in range(args.update_epochs):
            order = torch.as_tensor(np.random.permutation(args.batch_size), device=device)
            for minibatch in order.split(args.minibatch_size):
                # RPO's noise on the mean enters here, inside get_action_and_value.
                _, new_logprob, entropy, new_value = agent.get_action_and_value(
                    flat_obs[minibatch], flat_actions[minibatch]
                )
                log_ratio = new_logprob - flat_logprobs[minibatch]
                ratio = log_ratio.exp()
                with torch.no_grad():  # diagnostics: two estimators of KL(old || new), share of clipped ratios
                    old_approx_kl = (-log_ratio).mean()
                    approx_kl = (ratio - 1 - log_ratio).mean()
                    clipped_fractions.append(((ratio - 1).abs() > args.clip_coef).float().mean().item())

                adv = flat_advantages[minibatch]
                if args.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                # Pessimistic (clipped) surrogate objective, negated into a loss.
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv)
                pg_loss = -surrogate.mean()

                new_value = new_value.flatten()
                target = flat_returns[minibatch]
                value_error = (new_value - target) ** 2
                if args.clip_vloss:  # also pessimistic: the larger error of the clipped and the free value update
                    old_value = flat_values[minibatch]
                    clipped_value = old_value + (new_value - old_value).clamp(-args.clip_coef, args.clip_coef)
                    value_error = torch.max(value_error, (clipped_value - target) ** 2)
                v_loss = 0.5 * value_error.mean()

                entropy_loss = entropy.mean()
                loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        # How much of the variance of the return targets the rollout's value estimates explained (1 = all).
        return_var = flat_returns.var().item()
        explained_var = float("nan") if return_var == 0 else 1 - (flat_returns - flat_values).var().item() / return_var

        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipped_fractions), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)

        now = time.time()
        if now - last_progress >= 30 or iteration == args.num_iterations:
            last_progress = now
            eta = (args.num_iterations * args.batch_size - global_step) / max(sps, 1)
            print(
                f"global_step={global_step}/{args.num_iterations * args.batch_size} "
                f"({100 * iteration / args.num_iterations:.0f}%), SPS={sps}, "
                f"latest episodic_return={latest_return:.1f}, time left {format_duration(eta)}",
                flush=True,
            )

        # Checkpoint at the end of an iteration, where the state is consistent: periodically, and when the job is
        # about to stop: SLURM's time-limit warning (USR1; the job then requeues itself) or scancel/preemption (TERM).
        if stop.requested or clock.due():
            writer.flush()  # all that was logged up to global_step is on disk before the resume file says so
            save_resume(run_dir, SCRIPT, args, global_step=global_step, iteration=iteration,
                        model=agent.state_dict(), optimizer=optimizer.state_dict(),
                        normalization=sub_env_statistics(envs))
            if stop.requested:
                envs.close()
                writer.close()
                stop_for_requeue(stop)

    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        statistics = training_statistics(envs)
        save_checkpoint(
            model_path,
            SCRIPT,
            args,
            model=agent.state_dict(),
            obs_rms=statistics["obs_rms"],
            return_rms=statistics["return_rms"],
            obs_dim=obs_dim,
            action_dim=action_dim,
            global_step=global_step,
        )
        print(f"model and normalisation statistics saved to {model_path}", flush=True)
        video_dir = f"videos/{run_name}-eval" if args.capture_video else None
        eval_returns, eval_lengths = evaluate(
            agent, args.env_id, statistics, args.eval_episodes, args.seed, args.gamma, device, video_dir
        )
        for idx, episodic_return in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)
        print_evaluation(eval_returns, eval_lengths, "the training envs")

    envs.close()
    writer.close()
