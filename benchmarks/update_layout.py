"""Milliseconds of one update step of every image-based training script, in float32 with the images in NCHW order,
in float32 channels-last, and in bfloat16 mixed precision (channels-last): the cheap wins besides compiling; and,
with `--layouts`, the equivariant networks' update through their traceable twins (`traced`: eager; `compile`:
torch.compile of the update through the twins, as `--compile` runs it; both channels-last float32).

Each script's own update function runs on random data of its real shapes (the settings below: the scripts'
defaults for the Atari PPO pair, the CPU presets for the manipulation scripts), on fresh copies of the same networks
and optimizers, in one process. The layouts take turns, `--rounds` rounds of `--steps` timed updates after one
untimed warm-up each; the result per layout is the median over all timed updates, and the ratio is NCHW's median
over the layout's. bfloat16 is each script's own `--bf16` (autocast over the forward passes of its update). The
first update of each layout and round is not timed (under `compile` the first one compiles); `recompiles` counts the
functions dynamo compiled again after that first round (0: the compiled update is reused as it is).

    uv run python benchmarks/update_layout.py --device cpu --tag _cpu
    uv run python benchmarks/update_layout.py --models equi --layouts channels_last traced compile --tag _cpu_traced
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch._dynamo.utils

from cleanrl_equi.compile import with_bf16_autocast
from cleanrl_equi.traceable import through_traced

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Output, cli, fail, load_average, load_script, machine_info, results_path  # noqa: E402

SCRIPTS = ("ppo_atari", "ppo_atari_equi", "dqn_equi_bullet", "sac_equi_bullet", "cql_equi_offline",
           "iql_equi_offline")
LAYOUTS = ("nchw", "channels_last", "bf16", "traced", "compile")
MANIPULATION = {"group_order": 4, "n_hidden": 16, "image_size": 64, "batch_size": 32}  # the CPU preset


@dataclass
class Args(Output):
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """the scripts whose update steps to time"""
    models: list[str] = field(default_factory=lambda: ["equi", "cnn"])
    """the manipulation scripts' models to time"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the networks run"""
    threads: int = 1
    """torch threads (1: on a shared 2-core machine, see compile_speed.py --threads)"""
    rounds: int = 3
    """rounds of all layouts"""
    steps: int = 4
    """timed updates per layout and round"""
    layouts: list[str] = field(default_factory=lambda: ["nchw", "channels_last", "bf16"])
    """the layouts to time (nchw, channels_last, bf16, traced, compile); the ratios are to the first one"""


def images(n: int, channels: int, size: int, device, uint8: bool = False) -> torch.Tensor:
    if uint8:
        return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, device=device)
    return torch.rand(n, channels, size, size, device=device)


def as_run(step, layout: str, *networks):
    """The update step as `layout` runs it: as it is, through the networks' traceable twins, or compiled through
    them (the compiled function inside the swap, as the scripts do it)."""
    if layout == "compile":
        return through_traced(torch.compile(step), *networks)
    return through_traced(step, *networks) if layout == "traced" else step


def ppo_case(name: str, device):
    module = load_script(name)
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    n = args.num_envs * args.num_steps // args.num_minibatches
    torch.manual_seed(0)
    agent = module.Agent(args).to(device).train()
    batch = {"obs": images(n, 4, 84, device, uint8=True), "actions": torch.randint(0, 4, (n,), device=device),
             "logprobs": -torch.rand(n, device=device) - 1, "advantages": torch.randn(n, device=device),
             "returns": torch.randn(n, device=device), "values": torch.randn(n, device=device)}

    def make(layout: str):
        a = copy.deepcopy(agent)
        run_args = copy.copy(args)
        run_args.bf16 = layout == "bf16"
        optimizer = torch.optim.Adam(a.parameters(), lr=args.learning_rate, eps=1e-5)
        step = as_run(with_bf16_autocast(module.update_step, run_args, device), layout, a)
        return lambda b: step(a, optimizer, run_args, **b)
    return make, batch, f"minibatch {n} of 4 x 84 x 84 frames"


def dqn_case(model: str, device):
    module = load_script("dqn_equi_bullet")
    args = module.Args(model=model, n_hidden=16, image_size=64, batch_size=32)
    torch.manual_seed(0)
    q_network = module.make_q_network(args).to(device)
    n, s = args.batch_size, args.image_size
    batch = {"data": {"obs": images(n, 2, s, device), "next_obs": images(n, 2, s, device),
                      "actions": torch.randint(0, module.NUM_ACTIONS, (n,), device=device),
                      "rewards": torch.rand(n, device=device), "terminated": torch.zeros(n, device=device)}}

    def make(layout: str):
        run_args = copy.copy(args)
        run_args.bf16 = layout == "bf16"
        q = copy.deepcopy(q_network)
        target = copy.deepcopy(q).requires_grad_(False)
        optimizer = torch.optim.Adam(q.parameters(), lr=args.learning_rate)
        step = as_run(with_bf16_autocast(module.update_step, run_args, device), layout, q, target)
        return lambda b: step(q, target, optimizer, run_args, **b)
    return make, batch, f"batch {n} of 2 x {s} x {s}, n_hidden 16"


def actor_critic_case(name: str, model: str, device):
    module = load_script(name)
    args = base_args = module.Args(model=model, **MANIPULATION)
    torch.manual_seed(0)
    nets = {"actor": (module.EquiActor if model == "equi" else module.CNNActor)(args).to(device),
            "critic": (module.EquiCritic if model == "equi" else module.CNNCritic)(args).to(device)}
    if name == "iql_equi_offline":
        nets["value"] = (module.EquiValue if model == "equi" else module.CNNValue)(args).to(device)
    n, s = args.batch_size, args.image_size
    transitions = {"obs": images(n, 2, s, device), "next_obs": images(n, 2, s, device),
                   "actions": torch.rand(n, 5, device=device) * 2 - 1, "rewards": torch.rand(n, device=device),
                   "terminated": torch.zeros(n, device=device)}

    def make(layout: str):
        args = copy.copy(base_args)
        args.bf16 = layout == "bf16"
        state = copy.deepcopy(nets)
        state["critic_target"] = copy.deepcopy(state["critic"]).requires_grad_(False)
        adam = {k: torch.optim.Adam(v.parameters()) for k, v in state.items() if k != "critic_target"}
        log_alpha = torch.zeros(1, device=device, requires_grad=True)
        alpha_optimizer = torch.optim.Adam([log_alpha])
        if name == "sac_equi_bullet":
            critic_step = as_run(with_bf16_autocast(module.critic_update_step, args, device), layout, *state.values())
            actor_step = as_run(with_bf16_autocast(module.actor_update_step, args, device), layout, *state.values())

            def step(b):
                features = critic_step(state["actor"], state["critic"], state["critic_target"], adam["critic"],
                                       log_alpha, args, b)["features"]
                return actor_step(state["actor"], state["critic"], adam["actor"], log_alpha, alpha_optimizer, args, b,
                                  features)
            return step
        if name == "cql_equi_offline":
            log_cql_alpha = torch.zeros(1, device=device, requires_grad=True)
            cql_alpha_optimizer = torch.optim.Adam([log_cql_alpha])
            cql_step = as_run(with_bf16_autocast(module.update_step, args, device), layout, *state.values())
            return lambda b: cql_step(
                state["actor"], state["critic"], state["critic_target"], adam["actor"], adam["critic"], log_alpha,
                alpha_optimizer, log_cql_alpha, cql_alpha_optimizer, args, b)
        iql_step = as_run(with_bf16_autocast(module.update_step, args, device), layout, *state.values())
        return lambda b: iql_step(
            state["actor"], state["critic"], state["critic_target"], state["value"], adam["actor"], adam["critic"],
            adam["value"], args, b)
    batch = transitions if name != "sac_equi_bullet" else {**transitions, "expert": torch.zeros(n, dtype=torch.bool,
                                                                                                device=device)}
    return make, batch, f"batch {n} of 2 x {s} x {s}, group order 4, n_hidden 16"


def channels_last(batch):
    if isinstance(batch, dict):
        return {k: channels_last(v) for k, v in batch.items()}
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


def main() -> None:
    args = cli(Args, __doc__)
    bad = [s for s in args.scripts if s not in SCRIPTS] + [f"layout {x}" for x in args.layouts if x not in LAYOUTS]
    if bad:
        fail(f"unknown {bad[0]!r}; choose scripts from {', '.join(SCRIPTS)} and layouts from {', '.join(LAYOUTS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch sees no CUDA device; use --device cpu.")
    path = results_path(args, "update_layout.json")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layouts = list(dict.fromkeys(args.layouts))
    cases = []
    for script in args.scripts:
        if script.startswith("ppo"):
            cases.append((script, "-", *ppo_case(script, device)))
        for model in (args.models if not script.startswith("ppo") else []):
            case = dqn_case(model, device) if script == "dqn_equi_bullet" else actor_critic_case(script, model, device)
            cases.append((script, model, *case))
    rows = []
    for script, model, make, batch, shapes in cases:
        times: dict[str, list[float]] = {layout: [] for layout in layouts}
        steps = {layout: make(layout) for layout in layouts}
        batches = {layout: batch if layout == "nchw" else channels_last(batch) for layout in layouts}
        frames = torch._dynamo.utils.counters["frames"]
        for round_ in range(args.rounds):
            if round_ == 1:  # everything compiled once by now: any compile from here on is a recompile
                compiled_before = frames["ok"]
            for layout in layouts:
                for i in range(args.steps + 1):
                    sync()
                    start = time.perf_counter()
                    steps[layout](batches[layout])
                    sync()
                    if i:  # the first of each round warms the caches up (and compiles, in the first round)
                        times[layout].append(1000 * (time.perf_counter() - start))
        recompiles = frames["ok"] - compiled_before if args.rounds > 1 else None
        medians = {layout: statistics.median(t) for layout, t in times.items()}
        row = {"script": script, "model": model, "shapes": shapes, "recompiles": recompiles,
               "ms": {k: {"median": medians[k], "min": min(t), "max": max(t)} for k, t in times.items()},
               f"speedup_vs_{layouts[0]}": {k: medians[layouts[0]] / medians[k] for k in layouts}}
        rows.append(row)
        print(f"{script:17s} {model:4s} " + "  ".join(
            f"{k} {medians[k]:7.1f} ms (x{row[f'speedup_vs_{layouts[0]}'][k]:.2f})" for k in layouts)
            + f"  recompiles {recompiles}  load {load_average()[0]:.2f}", flush=True)
    record = {"benchmark": "update_layout", "machine": machine_info(args.device), "device": args.device,
              "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "layouts": layouts,
              "load_average_after": load_average(), "results": rows}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
