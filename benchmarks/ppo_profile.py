"""Where one iteration of PPO's time goes: ppo_atari.py (and ppo_atari_equi.py), phase by phase, on this machine.

The training loop of the scripts lives under their `__main__`, so this benchmark builds the env, the agent, the
optimizer and the (eager or compiled) steps exactly as the script does, from the script loaded as a module, and
re-states the rollout + GAE + update loop line for line (`PPOLoop.iteration`, kept the same as the scripts' loop: a
change to their loop must be made here too). Around the lines it puts wall clocks, one per phase:

    rollout   store (obs/done into the buffers), policy (the acting forward and its stores), action_to_host
              (`action.cpu().numpy()`: on a GPU the host waits here for the forward), env_step (the wait for the
              native vector env), to_device (NumPy -> tensors: obs, reward, done), episode_log (the infos loop)
    gae       the bootstrap value and the backwards GAE loop
    update    minibatch (shuffle, indices, gather, channels-last), forward_loss, backward, clip, optimizer
              (backward, clip and optimizer are timed by wrapping `Tensor.backward`, `clip_grad_norm_` and the
              optimizer's `step`/`zero_grad` on eager runs; forward_loss is the rest of `update_step`)
    stats     explained variance and the statistics read back to the host (`.item()`)
    python    the iteration's wall time that no phase above holds (the loop itself)

Two loops run side by side in one process, their iterations alternating after `--warmup` ones: `cleanrl`, the
per-step lines as they were before the `# SPEED` lines that remove host synchronisations (Categorical's argument
validation on: two `.item()`-like reads of a device tensor per acting step and per minibatch; the minibatch indices
a NumPy array, turned into a tensor once per buffer and minibatch), and `script`, the scripts' loop now.

Then one more iteration of each loop runs under a dispatch-mode counter (eager runs), which counts per phase the
aten operations, the host reads of a tensor's value (`_local_scalar_dense`: `.item()`, `bool(t)`, a comparison in
Python; each a synchronisation on a GPU), the tensors made from host (NumPy) data, and the copies between devices
(none on a CPU: there `torch.as_tensor` shares NumPy's memory), and one under torch.profiler (its top operations,
and on a GPU the CUDA memcpy and synchronize calls). The results: benchmarks/results/ppo_profile<tag>.json.

    OMP_NUM_THREADS=1 uv run python benchmarks/ppo_profile.py --device cpu --scripts ppo_atari ppo_atari_equi --tag _cpu
    uv run python benchmarks/ppo_profile.py --device cuda --scripts ppo_atari ppo_atari_equi --tag _gpu
    uv run python benchmarks/ppo_profile.py --device cuda --cudagraphs --variants script --tag _gpu_cudagraphs

The machine's cores may be shared with other jobs: compare fractions and the two loops' ratio, not absolute times
(the load average is recorded before and after).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Output, cli, fail, load_average, load_script, machine_info, results_path  # noqa: E402

SCRIPTS = ("ppo_atari", "ppo_atari_equi")
LOOPS = ("cleanrl", "script")
ROLLOUT = ("store", "policy", "action_to_host", "env_step", "to_device", "episode_log")
UPDATE = ("minibatch", "forward_loss", "backward", "clip", "optimizer")
PHASES = (*[f"rollout.{p}" for p in ROLLOUT], "gae", *[f"update.{p}" for p in UPDATE], "stats", "python")


@dataclass
class Args(Output):
    scripts: list[str] = field(default_factory=lambda: ["ppo_atari"])
    """the scripts to profile: ppo_atari, ppo_atari_equi"""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu, or cuda (the scripts' GPU path)"""
    variants: list[str] = field(default_factory=lambda: list(LOOPS))
    """the loops to run side by side: cleanrl (before the per-step sync removal), script (the scripts' loop now)"""
    env_id: str = "BreakoutNoFrameskip-v4"
    """the game"""
    num_envs: int = 8
    """envs (the scripts' default)"""
    num_steps: int = 128
    """steps per env per rollout (the scripts' default)"""
    warmup: int = 1
    """iterations of each loop before the measured ones (first-call costs, compiling)"""
    iterations: int = 3
    """measured iterations of each loop (alternating between the loops)"""
    compile: bool = False
    """run the script with --compile (the compiled update is one phase, nothing is counted; use --variants script:
    the cleanrl loop's validation switch would recompile the acting step)"""
    cudagraphs: bool = False
    """run the script with --cudagraphs (GPU only)"""
    bf16: bool = False
    """run the script with --bf16"""
    sync_phases: bool = False
    """on a GPU, synchronise at every phase boundary so each phase holds its own GPU time (adds syncs of its own)"""
    profile: bool = True
    """one more iteration of the script's loop under torch.profiler (its top operations)"""
    ab_before: Optional[str] = None
    """a git commit: also run the whole scripts of that commit and of the working tree, in turn, and compare their
    steady SPS (the settings above, `--ab-iterations` updates per run)"""
    ab_repeats: int = 2
    """runs of each version of each script with --ab-before (the order reversed every other round)"""
    ab_iterations: int = 5
    """updates per run with --ab-before (the steady SPS is measured from the second)"""


# ---- Timing and counting --------------------------------------------------------------------------------------------
class Phases:
    """Wall time per phase (seconds, summed over an iteration) and, while `counter` is set, the counts per phase."""

    def __init__(self, sync):
        self.sync = sync
        self.times: dict[str, float] = collections.defaultdict(float)
        self.current = "python"

    @contextlib.contextmanager
    def __call__(self, name: str):
        outer, self.current = self.current, name
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] += time.perf_counter() - start
            self.current = outer

    def reset(self) -> None:
        self.times = collections.defaultdict(float)


def op_counter(phases: Phases):
    """A dispatch mode that counts, per phase, what each aten call is: every op, host reads of a tensor's value,
    tensors made from host memory, copies between devices."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def devices(values) -> set:
        return {v.device for v in values if isinstance(v, torch.Tensor)}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            bucket = counts[phases.current]
            bucket["aten_ops"] += 1
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                bucket["host_reads"] += 1
            elif name == "lift_fresh":
                bucket["tensors_from_host"] += 1
            elif name in ("_to_copy", "copy_"):
                outs = out if isinstance(out, (tuple, list)) else [out]
                if len(devices([*args, *kwargs.values(), *outs])) > 1:
                    bucket["device_copies"] += 1
            return out

    return Counter(), counts


# ---- The script's setup and loop ------------------------------------------------------------------------------------
class PPOLoop:
    """The env, agent, optimizer, steps and buffers of one script, built as its `__main__` builds them."""

    def __init__(self, name: str, bench: Args):
        import numpy as np
        import torch
        import torch.optim as optim
        import tyro

        self.name, self.np, self.torch = name, np, torch
        module = self.module = load_script(name)
        flags = ["--env-id", bench.env_id, "--num-envs", str(bench.num_envs), "--num-steps", str(bench.num_steps)]
        flags += ["--no-cuda"] if bench.device == "cpu" else []
        flags += [f for f, on in (("--compile", bench.compile), ("--cudagraphs", bench.cudagraphs),
                                  ("--bf16", bench.bf16)) if on]
        args = self.args = tyro.cli(module.Args, args=flags)
        module.check_args(args)
        args.batch_size = int(args.num_envs * args.num_steps)
        args.minibatch_size = int(args.batch_size // args.num_minibatches)
        args.num_iterations = args.total_timesteps // args.batch_size

        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        device = self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if bench.device == "cuda" and device.type != "cuda":
            fail("--device cuda: torch sees no CUDA GPU on this machine.")

        self.envs = module.make_atari_envs(args.env_id, args.num_envs, args.env_backend, False, "ppo_profile",
                                           args.async_envs, playfield_crop=args.mirror_crop)
        agent = self.agent = module.Agent(args).to(device)
        self.optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
        acting_agent = agent
        if hasattr(module, "plain_copy") and args.compile:  # the equivariant script acts through a plain copy
            acting_agent = module.plain_copy(agent)
        self.acting_agent = acting_agent
        policy, update = acting_agent.get_action_and_value, module.update_step
        module.prepare_optimizer(self.optimizer, args, device)
        policy, update = [module.compiled(module.with_bf16_autocast(step, args, device), args)
                          for step in (policy, update)]
        if hasattr(module, "through_traced") and args.compile:
            update = module.through_traced(update, agent)
        self.policy, self.update = policy, update

        shape = (args.num_steps, args.num_envs)
        self.obs = torch.zeros(shape + self.envs.single_observation_space.shape, dtype=torch.uint8).to(device)
        self.actions = torch.zeros(shape + self.envs.single_action_space.shape, dtype=torch.long).to(device)
        self.logprobs = torch.zeros(shape).to(device)
        self.rewards = torch.zeros(shape).to(device)
        self.dones = torch.zeros(shape).to(device)
        self.values = torch.zeros(shape).to(device)
        self.global_step, self.iteration_number = 0, 1
        next_obs, _ = self.envs.reset(seed=args.seed)
        self.next_obs = torch.as_tensor(next_obs, device=device)
        self.next_done = torch.zeros(args.num_envs).to(device)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter("runs/ppo_profile")  # in the benchmark's temporary folder

    def iteration(self, loop: str, phase: Phases) -> None:
        """One PPO iteration of the script's loop (`loop` "cleanrl": the per-step lines before the sync removal)."""
        np, torch, module, args, device = self.np, self.torch, self.module, self.args, self.device
        envs, agent, optimizer, policy, update = self.envs, self.agent, self.optimizer, self.policy, self.update
        obs, actions, logprobs, rewards, dones, values = (self.obs, self.actions, self.logprobs, self.rewards,
                                                          self.dones, self.values)
        next_obs, next_done, global_step, iteration = (self.next_obs, self.next_done, self.global_step,
                                                       self.iteration_number)
        torch.distributions.Distribution.set_default_validate_args(loop == "cleanrl")

        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow
            module.set_learning_rate(optimizer, lrnow, args)
        if hasattr(module, "refresh"):
            module.refresh(self.acting_agent, agent)

        agent.eval()
        for step in range(0, args.num_steps):
            global_step += args.num_envs
            with phase("rollout.store"):
                obs[step] = next_obs
                dones[step] = next_done
            with phase("rollout.policy"):
                with torch.no_grad():
                    action, logprob, _, value = policy(next_obs)
                    values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob
            with phase("rollout.action_to_host"):
                host_action = action.cpu().numpy()
            with phase("rollout.env_step"):
                next_obs, reward, terminations, truncations, infos = envs.step(host_action)
            with phase("rollout.to_device"):
                next_done = np.logical_or(terminations, truncations)
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device).view(-1)
                next_obs, next_done = torch.as_tensor(next_obs, device=device), torch.Tensor(next_done).to(device)
            with phase("rollout.episode_log"):
                if "_episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        last_return = float(infos["episode"]["r"][i])
                        self.writer.add_scalar("charts/episodic_return", last_return, global_step)
                        self.writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)

        with phase("gae"):
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

        with phase("update.minibatch"):
            batch = dict(obs=obs, actions=actions, logprobs=logprobs, advantages=advantages, returns=returns,
                         values=values)
            batch = {key: value.flatten(0, 1) for key, value in batch.items()}
            agent.train()
            b_inds = np.arange(args.batch_size)
            clipfracs = []
        for epoch in range(args.update_epochs):
            with phase("update.minibatch"):
                np.random.shuffle(b_inds)
                if loop == "script":
                    device_inds = torch.as_tensor(b_inds, device=device)
            for start in range(0, args.batch_size, args.minibatch_size):
                with phase("update.minibatch"):
                    end = start + args.minibatch_size
                    mb_inds = b_inds[start:end]
                    if loop == "script":
                        mb_inds = device_inds[start:end]
                    minibatch = {key: value[mb_inds] for key, value in batch.items()}
                    if args.channels_last:
                        minibatch = module.channels_last(minibatch, keys=("obs",))
                with phase("update.forward_loss"):
                    stats = update(agent, optimizer, args, **minibatch)
                    clipfracs.append(stats["clipfrac"])
            if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
                break

        with phase("stats"):
            y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            stats["clipfrac"] = torch.stack(clipfracs).mean()
            self.last_stats = {key: value.item() for key, value in stats.items()}
            self.last_stats["explained_variance"] = float(explained_var)

        self.next_obs, self.next_done, self.global_step = next_obs, next_done, global_step
        self.iteration_number += 1


@contextlib.contextmanager
def update_split(loop: PPOLoop, phase: Phases, on: bool):
    """Time `loss.backward()`, the gradient clipping and the optimizer's step and zero_grad inside the update step
    (eager only: wrapping them would break a compiled step's graph). Their times go to their own phases; the
    forward_loss phase that holds them is corrected afterwards (`split_times`)."""
    import torch

    if not on:
        yield
        return
    original_backward, original_clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    optimizer = loop.optimizer

    def timed(fn, name):
        def wrapper(*a, **k):
            with phase(name):
                return fn(*a, **k)
        return wrapper

    torch.Tensor.backward = timed(original_backward, "update.backward")
    torch.nn.utils.clip_grad_norm_ = timed(original_clip, "update.clip")
    optimizer.step = timed(type(optimizer).step.__get__(optimizer), "update.optimizer")
    optimizer.zero_grad = timed(type(optimizer).zero_grad.__get__(optimizer), "update.optimizer")
    try:
        yield
    finally:
        torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = original_backward, original_clip
        del optimizer.step, optimizer.zero_grad


def split_times(times: dict[str, float], wall: float) -> dict[str, float]:
    """Nested phases out of their parents (backward, clip, optimizer from forward_loss) and the rest as `python`."""
    times = {p: times.get(p, 0.0) for p in PHASES}
    times["update.forward_loss"] -= times["update.backward"] + times["update.clip"] + times["update.optimizer"]
    times["python"] = wall - sum(v for k, v in times.items() if k != "python")
    return times


# ---- Measuring -------------------------------------------------------------------------------------------------------
def profile_script(name: str, bench: Args) -> dict:
    import torch

    loop = PPOLoop(name, bench)
    cuda = loop.device.type == "cuda"
    sync = torch.cuda.synchronize if (cuda and bench.sync_phases) else (lambda: None)
    phase = Phases(sync)
    eager = not loop.args.compile
    minibatches = loop.args.update_epochs * loop.args.num_minibatches
    steps_per_iteration = loop.args.num_envs * loop.args.num_steps

    def run(variant: str) -> dict[str, float]:
        phase.reset()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with update_split(loop, phase, eager):
            loop.iteration(variant, phase)
        if cuda:
            torch.cuda.synchronize()
        return split_times(phase.times, time.perf_counter() - start)

    for i in range(bench.warmup):
        for variant in bench.variants:
            run(variant)
    measured: dict[str, list[dict[str, float]]] = {v: [] for v in bench.variants}
    for i in range(bench.iterations):
        for variant in (bench.variants if i % 2 == 0 else bench.variants[::-1]):
            measured[variant].append(run(variant))
            print(f"{name} {variant:8s} iteration {i}: {sum(measured[variant][-1].values()):.2f} s", flush=True)

    result = {"script": name, "script_args": {k: v for k, v in vars(loop.args).items()
                                              if isinstance(v, (int, float, str, bool, type(None)))},
              "device": str(loop.device), "steps_per_iteration": steps_per_iteration,
              "minibatches_per_iteration": minibatches, "update_split": eager, "loops": {}}
    for variant, runs in measured.items():
        medians = {p: statistics.median(r[p] for r in runs) for p in PHASES}
        walls = [sum(r.values()) for r in runs]
        wall = statistics.median(walls)
        result["loops"][variant] = {
            "iteration_s": {"median": wall, "min": min(walls), "max": max(walls)},
            "sps": steps_per_iteration / wall,
            "phase_s_median": medians,
            "phase_fraction": {p: medians[p] / sum(medians.values()) for p in PHASES},
            "per_step_ms": {p: 1000 * medians[f"rollout.{p}"] / loop.args.num_steps for p in ROLLOUT},
            "per_minibatch_ms": {p: 1000 * medians[f"update.{p}"] / minibatches for p in UPDATE},
            "iterations": runs,
        }
    if eager:
        result["counts"] = {}
        for variant in bench.variants:
            mode, counts = op_counter(phase)
            with update_split(loop, phase, True), mode:
                loop.iteration(variant, phase)
            per_step = {p: dict(counts.get(f"rollout.{p}", {})) for p in ROLLOUT}
            per_step = {p: {k: v / loop.args.num_steps for k, v in c.items()} for p, c in per_step.items()}
            per_minibatch = {p: {k: v / minibatches for k, v in dict(counts.get(f"update.{p}", {})).items()}
                             for p in UPDATE}
            result["counts"][variant] = {"per_step": per_step, "per_minibatch": per_minibatch,
                                         "per_iteration": {p: dict(counts.get(p, {})) for p in ("gae", "stats")},
                                         "host_reads_per_iteration": sum(c["host_reads"] for c in counts.values())}
    else:
        result["counts"] = "not counted: a dispatch mode around compiled steps would change them"
    if bench.profile and "script" in bench.variants:
        result["profiler"] = torch_profile(loop, phase, cuda)
    loop.envs.close()
    loop.writer.close()
    return result


def torch_profile(loop: PPOLoop, phase: Phases, cuda: bool) -> dict:
    """One iteration of the script's loop under torch.profiler: the top operations by self time (CPU, and CUDA on a
    GPU), and on a GPU how many CUDA memcpy and synchronize calls the host made."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        loop.iteration("script", phase)
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key, 0) for e in averages) or 1
    top = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)[:15]
    rows = [{"op": e.key, "calls": e.count, "self_us": getattr(e, key, 0), "fraction": getattr(e, key, 0) / total}
            for e in top]
    record = {"by": key, "total_us": total, "top_ops": rows}
    if cuda:
        calls = ("cudaMemcpy", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaLaunchKernel")
        runtime = {e.key: e.count for e in averages if e.key.startswith(calls)}
        record["cuda_runtime_calls"] = runtime
    return record


def whole_script_ab(bench: Args, workdir: str) -> dict:
    """The scripts of commit `--ab-before` and of the working tree, run as a user runs them, in turn: steady SPS."""
    import subprocess

    from compile_speed import event_series

    versions = {"before": os.path.join(workdir, "before"), "after": REPO}
    os.makedirs(versions["before"])
    for name in bench.scripts:
        shown = subprocess.run(["git", "-C", REPO, "show", f"{bench.ab_before}:{name}.py"], capture_output=True,
                               text=True)
        if shown.returncode != 0:
            fail(f"--ab-before {bench.ab_before}: git cannot show {name}.py at that commit.")
        with open(os.path.join(versions["before"], f"{name}.py"), "w") as f:
            f.write(shown.stdout)
    settings = ["--env-id", bench.env_id, "--num-envs", str(bench.num_envs), "--num-steps", str(bench.num_steps),
                "--total-timesteps", str(bench.ab_iterations * bench.num_envs * bench.num_steps)]
    settings += (["--no-cuda"] if bench.device == "cpu" else []) + [
        f for f, on in (("--compile", bench.compile), ("--cudagraphs", bench.cudagraphs), ("--bf16", bench.bf16)) if on]
    runs = []
    for name in bench.scripts:
        for repeat in range(bench.ab_repeats):
            for version in (("before", "after") if repeat % 2 == 0 else ("after", "before")):
                run_dir = os.path.join(workdir, f"{name}_{version}_{repeat}")
                os.makedirs(run_dir)
                load = load_average()
                subprocess.run([sys.executable, os.path.join(versions[version], f"{name}.py"), *settings],
                               cwd=run_dir, env={**os.environ, "PYTHONPATH": REPO}, check=True,
                               capture_output=True)
                series = event_series(os.path.join(run_dir, "runs", os.listdir(os.path.join(run_dir, "runs"))[0]),
                                      "charts/SPS")
                (t0, s0), (t1, s1) = series[1], series[-1]
                runs.append({"script": name, "version": version, "steady_sps": (s1 - s0) / (t1 - t0),
                             "load_before": load, "load_after": load_average()})
                print(f"{name} {version:6s} steady SPS {runs[-1]['steady_sps']:.1f} (load {load[0]})", flush=True)
    summary = {}
    for name in bench.scripts:
        sps = {v: statistics.median(r["steady_sps"] for r in runs if r["script"] == name and r["version"] == v)
               for v in versions}
        summary[name] = {"before_sps_median": sps["before"], "after_sps_median": sps["after"],
                         "ratio": sps["after"] / sps["before"]}
    return {"before_commit": bench.ab_before, "settings": settings, "summary": summary, "runs": runs}


def print_table(result: dict) -> None:
    loops = result["loops"]
    names = list(loops)
    print(f"\n{result['script']} on {result['device']}: {result['steps_per_iteration']} steps per iteration")
    print(f"{'phase':24s}" + "".join(f"{n + ' s':>12s}{'share':>8s}" for n in names))
    for p in PHASES:
        print(f"{p:24s}" + "".join(f"{loops[n]['phase_s_median'][p]:12.3f}{loops[n]['phase_fraction'][p]:8.1%}"
                                    for n in names))
    print(f"{'iteration':24s}" + "".join(f"{loops[n]['iteration_s']['median']:12.3f}{'':8s}" for n in names))
    print(f"{'SPS':24s}" + "".join(f"{loops[n]['sps']:12.1f}{'':8s}" for n in names))
    if not result["update_split"]:
        print("(compiled: update.forward_loss is the whole update step)")
    if isinstance(result.get("counts"), dict):
        for n in names:
            c = result["counts"][n]
            step_reads = sum(v.get("host_reads", 0) for v in c["per_step"].values())
            step_host = sum(v.get("tensors_from_host", 0) for v in c["per_step"].values())
            step_ops = sum(v.get("aten_ops", 0) for v in c["per_step"].values())
            mb_reads = sum(v.get("host_reads", 0) for v in c["per_minibatch"].values())
            mb_host = sum(v.get("tensors_from_host", 0) for v in c["per_minibatch"].values())
            print(f"{n}: per acting step {step_ops:.0f} aten ops, {step_reads:.0f} host reads, {step_host:.0f} "
                  f"tensors from host; per minibatch {mb_reads:.0f} host reads, {mb_host:.0f} tensors from host; "
                  f"{c['host_reads_per_iteration']} host reads per iteration")


def main() -> None:
    bench = cli(Args, __doc__)
    unknown = [s for s in bench.scripts if s not in SCRIPTS]
    if unknown:
        fail(f"unknown script {unknown[0]!r}; choose from {', '.join(SCRIPTS)}.")
    bad = [v for v in bench.variants if v not in LOOPS]
    if bad or not bench.variants:
        fail(f"unknown loop {bad[0] if bad else ''!r}; choose from {', '.join(LOOPS)}.")
    if bench.iterations < 1 or bench.warmup < 0:
        fail("--iterations must be at least 1 and --warmup at least 0.")
    if bench.ab_repeats < 1 or bench.ab_iterations < 3:
        fail("--ab-repeats must be at least 1 and --ab-iterations at least 3.")
    if bench.cudagraphs and bench.device != "cuda":
        fail("--cudagraphs needs --device cuda.")
    path = results_path(bench, "ppo_profile.json")
    import torch

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    load_before = load_average()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ppo_profile_") as workdir:
        os.chdir(workdir)  # anything a script writes (compile caches excepted) stays out of the repository
        results = [profile_script(name, bench) for name in bench.scripts]
        ab = whole_script_ab(bench, workdir) if bench.ab_before else None
    record = {"benchmark": "ppo_profile", "machine": machine_info(bench.device), "load_before": load_before,
              "load_after": load_average(), "wall_s": time.time() - started,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
              "settings": {k: v for k, v in vars(bench).items() if k not in ("out", "tag", "overwrite")},
              "loops": {"cleanrl": "the per-step lines before the sync removal: Categorical's argument validation on "
                                   "(host reads in acting and in every minibatch), NumPy minibatch indices",
                        "script": "the scripts' loop now (validation off, the minibatch indices one device tensor "
                                  "per epoch)"},
              "results": results, "whole_script_ab": ab}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    for result in results:
        print_table(result)
    for name, row in (ab or {}).get("summary", {}).items():
        print(f"{name}: whole script at {bench.ab_before} {row['before_sps_median']:.1f} SPS, working tree "
              f"{row['after_sps_median']:.1f} SPS ({row['ratio']:.3f}x)")
    print(f"\nload average before {load_before}, after {record['load_after']}; wrote {path}", flush=True)


if __name__ == "__main__":
    main()
