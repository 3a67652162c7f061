"""Time the CQL critic step of cql_equi_offline.py: images encoded once per batch vs re-encoded per action.

The CQL(H) penalty evaluates Q at 3n proposal actions per state (n uniform, n from pi(.|s), n from pi(.|s')).
`encode once` is what the script does: the critic's encoder runs on the B images, the features are repeated 3n
times and only the small Q heads see the B * 3n actions. `re-encode` is the straightforward way (the original code's
CQL_SAC): the images themselves are repeated, so the encoder runs on B * (3n + 1) images. Both compute the same
loss (checked to float tolerance at start-up); the time is forward + backward + Adam step of the critic, median of
--repeats after --warmup, measured side by side in one process.

    uv run python benchmarks/cql_update_time.py --overwrite           # CPU preset, a few minutes
    uv run python benchmarks/cql_update_time.py --device cuda --group-order 8 --n-hidden 64 --image-size 128 --tag _gpu

Writes benchmarks/results/cql_update_time<tag>.json (or --out; existing results only with --overwrite).
"""

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Output, cli, cpu_model, load_script, machine_info, results_path  # noqa: E402

cql = load_script("cql_equi_offline")  # its networks and loss pieces


@dataclass
class Args(Output):
    tag: str = "_cpu"
    """suffix of the default results name, e.g. '_gpu' (not used with --out)"""
    device: str = "cpu"
    """torch device to time on, e.g. cpu, cuda"""
    models: str = "equi,cnn"
    """comma-separated models to time: equi, cnn"""
    group_order: int = 4
    """order N of the rotation group C_N of the equivariant networks"""
    n_hidden: int = 32
    """hidden width of the networks (the script's --n-hidden)"""
    image_size: int = 64
    """observation height and width in pixels"""
    batch_size: int = 8
    """states per batch (the paper's 8)"""
    num_actions: int = 10
    """n per proposal (the paper's 10)"""
    warmup: int = 2
    """untimed critic steps before the timed ones"""
    repeats: int = 5
    """timed critic steps per variant (the median is reported)"""
    hardware: str = ""
    """hardware description for the results (default: the CPU model, or the GPU)"""


def build_critic(args):
    """The critic the script builds for `args`."""
    return cql.EquiCritic(args) if args.model == "equi" else cql.CNNCritic(args)


def critic_loss(critic, obs, actions, proposals, n, reencode: bool):
    """MSE-free part that differs between the two ways: data Q plus the CQL gap over the 3n proposals."""
    features = critic.encode(obs)
    q1, q2 = critic.q_values(features, actions)
    if reencode:
        repeated_obs = cql.repeat_rows(obs, n)
        evaluations = [critic(repeated_obs, a) for a in proposals["actions"]]
    else:
        repeated = cql.repeat_rows(features, n)
        evaluations = [critic.q_values(repeated, a) for a in proposals["actions"]]
    (q1u, q2u), (q1c, q2c), (q1n, q2n) = [(a.view(-1, n), b.view(-1, n)) for a, b in evaluations]
    lp_c, lp_n = proposals["logp_current"], proposals["logp_next"]
    gap1 = cql.cql_gap(q1, q1u, q1c, lp_c, q1n, lp_n, 1.0)
    gap2 = cql.cql_gap(q2, q2u, q2c, lp_c, q2n, lp_n, 1.0)
    target = torch.zeros_like(q1)
    return F.mse_loss(q1, target) + F.mse_loss(q2, target) + gap1 + gap2


def time_variant(critic, optimizer, obs, actions, proposals, n, reencode, warmup, repeats, device):
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = critic_loss(critic, obs, actions, proposals, n, reencode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    opts = cli(Args, __doc__)
    out = results_path(opts, "cql_update_time.json")
    device = torch.device(opts.device)
    torch.manual_seed(0)
    b, n = opts.batch_size, opts.num_actions
    obs = torch.rand(b, 2, opts.image_size, opts.image_size, device=device)
    obs[:, 1] = (torch.rand(b, 1, 1, device=device) > 0.5).float()
    actions = torch.rand(b, 5, device=device) * 2 - 1
    proposals = {"actions": [torch.rand(b * n, 5, device=device) * 2 - 1 for _ in range(3)],
                 "logp_current": torch.randn(b, n, device=device), "logp_next": torch.randn(b, n, device=device)}
    rows = []
    for model in opts.models.split(","):
        args = cql.Args(model=model, group_order=opts.group_order, n_hidden=opts.n_hidden, image_size=opts.image_size)
        critic = build_critic(args).to(device)
        optimizer = torch.optim.Adam(critic.parameters(), lr=1e-4)
        with torch.no_grad():  # the two ways compute the same loss
            once = critic_loss(critic, obs, actions, proposals, n, reencode=False)
            again = critic_loss(critic, obs, actions, proposals, n, reencode=True)
            assert torch.allclose(once, again, rtol=1e-4, atol=1e-4), (once.item(), again.item())
        result = {"model": model}
        for name, reencode in (("encode_once", False), ("reencode", True)):
            seconds = time_variant(critic, optimizer, obs, actions, proposals, n, reencode, opts.warmup,
                                   opts.repeats, device)
            result[f"{name}_ms"] = round(1000 * seconds, 2)
        result["speedup"] = round(result["reencode_ms"] / result["encode_once_ms"], 2)
        print(result, flush=True)
        rows.append(result)
    machine = machine_info(opts.device)
    info = {"date": time.strftime("%Y-%m-%d"), "hardware": opts.hardware or machine.get("gpu") or cpu_model(),
            "device": opts.device, "torch_threads": torch.get_num_threads(), "machine": machine,
            "settings": {k: v for k, v in vars(opts).items() if k not in ("hardware", "tag", "out", "overwrite")},
            "results": rows}
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
