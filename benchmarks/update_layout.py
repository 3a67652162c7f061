"""Milliseconds of one update step of every image-based training script, in float32 with the images in NCHW order,
in float32 channels-last, and in bfloat16 mixed precision (channels-last): the cheap wins besides compiling.

Each script's own update function runs on random data of its real shapes (the settings below: the scripts'
defaults for the Atari PPO pair, the CPU presets for the manipulation scripts), on fresh copies of the same networks
and optimizers, in one process. The layouts take turns, `--rounds` rounds of `--steps` timed updates after one
untimed warm-up each; the result per layout is the median over all timed updates, and the ratio is NCHW's median
over the layout's. bfloat16 is each script's own `--bf16` (autocast over the forward passes of its update).

    uv run python benchmarks/update_layout.py --device cpu --tag _cpu
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

from cleanrl_equi.compile import with_bf16_autocast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Output, cli, fail, load_average, load_script, machine_info, results_path  # noqa: E402

SCRIPTS = ("ppo_atari", "ppo_atari_equi", "dqn_equi_bullet", "sac_equi_bullet", "cql_equi_offline",
           "iql_equi_offline")
LAYOUTS = ("nchw", "channels_last", "bf16")
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


def images(n: int, channels: int, size: int, device, uint8: bool = False) -> torch.Tensor:
    if uint8:
        return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, device=device)
    return torch.rand(n, channels, size, size, device=device)


def ppo_case(name: str, device):
    module = load_script(name)
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    n = args.num_envs * args.num_steps // args.num_minibatches
    torch.manual_seed(0)
    agent = module.Agent(args).to(device).train()
    batch = {"obs": images(n, 4, 84, device, uint8=True), "actions": torch.randint(0, 4, (n,), device=device),
             "logprobs": -torch.rand(n, device=device) - 1, "advantages": torch.randn(n, device=device),
             "returns": torch.randn(n, device=device), "values": torch.randn(n, device=device)}

    def make(bf16: bool):
        a = copy.deepcopy(agent)
        run_args = copy.copy(args)
        run_args.bf16 = bf16
        optimizer = torch.optim.Adam(a.parameters(), lr=args.learning_rate, eps=1e-5)
        step = with_bf16_autocast(module.update_step, run_args, device)
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

    def make(bf16: bool):
        run_args = copy.copy(args)
        run_args.bf16 = bf16
        q = copy.deepcopy(q_network)
        target = copy.deepcopy(q).requires_grad_(False)
        optimizer = torch.optim.Adam(q.parameters(), lr=args.learning_rate)
        step = with_bf16_autocast(module.update_step, run_args, device)
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

    def make(bf16: bool):
        args = copy.copy(base_args)
        args.bf16 = bf16
        state = copy.deepcopy(nets)
        state["critic_target"] = copy.deepcopy(state["critic"]).requires_grad_(False)
        adam = {k: torch.optim.Adam(v.parameters()) for k, v in state.items() if k != "critic_target"}
        log_alpha = torch.zeros(1, device=device, requires_grad=True)
        alpha_optimizer = torch.optim.Adam([log_alpha])
        if name == "sac_equi_bullet":
            critic_step = with_bf16_autocast(module.critic_update_step, args, device)
            actor_step = with_bf16_autocast(module.actor_update_step, args, device)

            def step(b):
                features = critic_step(state["actor"], state["critic"], state["critic_target"], adam["critic"],
                                       log_alpha, args, b)["features"]
                return actor_step(state["actor"], state["critic"], adam["actor"], log_alpha, alpha_optimizer, args, b,
                                  features)
            return step
        if name == "cql_equi_offline":
            log_cql_alpha = torch.zeros(1, device=device, requires_grad=True)
            cql_alpha_optimizer = torch.optim.Adam([log_cql_alpha])
            return lambda b: with_bf16_autocast(module.update_step, args, device)(
                state["actor"], state["critic"], state["critic_target"], adam["actor"], adam["critic"], log_alpha,
                alpha_optimizer, log_cql_alpha, cql_alpha_optimizer, args, b)
        return lambda b: with_bf16_autocast(module.update_step, args, device)(
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
    bad = [s for s in args.scripts if s not in SCRIPTS]
    if bad:
        fail(f"unknown script {bad[0]!r}; choose from {', '.join(SCRIPTS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch sees no CUDA device; use --device cpu.")
    path = results_path(args, "update_layout.json")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = []
    for script in args.scripts:
        if script.startswith("ppo"):
            cases.append((script, "-", *ppo_case(script, device)))
        for model in (args.models if not script.startswith("ppo") else []):
            case = dqn_case(model, device) if script == "dqn_equi_bullet" else actor_critic_case(script, model, device)
            cases.append((script, model, *case))
    rows = []
    for script, model, make, batch, shapes in cases:
        times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        steps = {"nchw": make(False), "channels_last": make(False), "bf16": make(True)}
        batches = {"nchw": batch, "channels_last": channels_last(batch), "bf16": channels_last(batch)}
        for _ in range(args.rounds):
            for layout in LAYOUTS:
                for i in range(args.steps + 1):
                    sync()
                    start = time.perf_counter()
                    steps[layout](batches[layout])
                    sync()
                    if i:  # the first of each round warms the caches up
                        times[layout].append(1000 * (time.perf_counter() - start))
        medians = {layout: statistics.median(t) for layout, t in times.items()}
        row = {"script": script, "model": model, "shapes": shapes,
               "ms": {k: {"median": medians[k], "min": min(t), "max": max(t)} for k, t in times.items()},
               "speedup_vs_nchw": {k: medians["nchw"] / medians[k] for k in LAYOUTS}}
        rows.append(row)
        print(f"{script:17s} {model:4s} " + "  ".join(f"{k} {medians[k]:7.1f} ms (x{row['speedup_vs_nchw'][k]:.2f})"
                                                    for k in LAYOUTS) + f"  load {load_average()[0]:.2f}", flush=True)
    record = {"benchmark": "update_layout", "machine": machine_info(args.device), "device": args.device,
              "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "results": rows}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
