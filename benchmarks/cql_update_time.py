"""Time the CQL critic step of cql_equi_offline.py: images encoded once per batch vs re-encoded per action.

The CQL(H) penalty evaluates Q at 3n proposal actions per state (n uniform, n from pi(.|s), n from pi(.|s')).
`encode once` is what the script does: the critic's encoder runs on the B images, the features are repeated 3n
times and only the small Q heads see the B * 3n actions. `re-encode` is the straightforward way (the original code's
CQL_SAC): the images themselves are repeated, so the encoder runs on B * (3n + 1) images. Both compute the same
loss (checked to float tolerance at start-up); the time is forward + backward + Adam step of the critic, median of
--repeats after --warmup, measured side by side in one process.

    uv run python benchmarks/cql_update_time.py                       # CPU preset, a few minutes
    uv run python benchmarks/cql_update_time.py --device cuda --group-order 8 --n-hidden 64 --image-size 128 --tag _gpu
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("cql_equi_offline", os.path.join(HERE, "..", "cql_equi_offline.py"))
cql = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cql)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="equi,cnn")
    parser.add_argument("--group-order", type=int, default=4)
    parser.add_argument("--n-hidden", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="the paper's 8")
    parser.add_argument("--num-actions", type=int, default=10, help="n per proposal (the paper's 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hardware", default=platform.processor() or platform.machine())
    parser.add_argument("--tag", default="_cpu")
    opts = parser.parse_args()
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
        critic = cql.build_networks(args)[1].to(device)
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
    info = {"date": time.strftime("%Y-%m-%d"), "hardware": opts.hardware, "device": opts.device,
            "torch_threads": torch.get_num_threads(), "settings": {k: v for k, v in vars(opts).items()
                                                                  if k not in ("hardware", "tag")}, "results": rows}
    out = os.path.join(HERE, "results", f"cql_update_time{opts.tag}.json")
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
