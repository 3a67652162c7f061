"""Time one SAC gradient step of sac_equi_bullet.py against a straightforward implementation, with a breakdown.

Both variants use the networks of `sac_equi_bullet.py` (the paper's layer spec: C_N encoder, equivariant actor,
twin-head invariant critic) and the same losses; they differ only in how the update is computed:

  straightforward  what a direct transcription of the algorithm does: the actor loss evaluates the full critic on
                   (s, pi(s)) again, so the critic's encoder runs forward and backward a second time (its weight
                   gradients are computed and thrown away); every network in train mode.
  reuse            the critic's encoder output for s is computed once and reused (detached) by the actor loss, so
                   only the two 1x1 Q heads run again;
  ours             the update in sac_equi_bullet.py: `reuse` with the image batches in channels-last memory format
                   (faster convolutions in oneDNN / cuDNN).

Phases timed (seconds per gradient step, device synchronised around each): sample (buffer -> batch on device,
rotation augmentation), target (actor on s', target critic on s', no grad), critic (critic forward + backward +
Adam), actor (actor forward + backward incl. the critic evaluation + Adam + alpha), polyak.

    uv run python benchmarks/sac_update_time.py --device cpu --repeats 3 --overwrite # this machine
    uv run python benchmarks/sac_update_time.py --device cuda --repeats 20           # on a GPU node
    uv run python benchmarks/sac_update_time.py --group-order 4 --n-hidden 16 --image-size 64 --batch-size 8 \\
        --repeats 1 --out /tmp/sac_update_time.json                                 # a quick check
Results go to benchmarks/results/sac_update_time_<device><tag>.{json,csv,png} (or --out and its .csv/.png); existing
results are replaced only when --out names them or with --overwrite.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cleanrl_equi.buffers import ReplayBuffer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Output, cli, companion, cpu_model, load_script, machine_info, results_path  # noqa: E402

sac = load_script("sac_equi_bullet")  # its networks, replay buffer and augmentation
from cleanrl_equi.equivariant import count_parameters  # noqa: E402


@dataclass
class Args(Output):
    device: str = "cpu"
    """torch device to time on, e.g. cpu, cuda (it names the results: sac_update_time_<device type><tag>)"""
    group_order: int = 8
    """order N of the rotation group C_N of the equivariant networks"""
    n_hidden: int = 64
    """hidden width of the networks (the script's --n-hidden)"""
    image_size: int = 128
    """observation height and width in pixels"""
    batch_size: int = 64
    """replay batch size"""
    models: str = "equi,cnn"
    """comma-separated models to time: equi, cnn"""
    variants: str = "straightforward,reuse,ours"
    """comma-separated update variants: straightforward, reuse, ours"""
    repeats: int = 3
    """timed gradient steps per variant (after 1 warm-up)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    plot_only: bool = False
    """only redraw the .png from the results .json"""


def build_networks(args):
    """The actor and critic the script builds for `args`."""
    if args.model == "equi":
        return sac.EquiActor(args), sac.EquiCritic(args)
    return sac.CNNActor(args), sac.CNNCritic(args)


def timer(device):
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def make_setup(args, device, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    actor, critic = build_networks(args)
    _, critic_target = build_networks(args)
    actor, critic, critic_target = actor.to(device), critic.to(device), critic_target.to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    rb = ReplayBuffer(4096, 1, args.image_size)
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 120, (1, 2, args.image_size, args.image_size), dtype=np.uint8)
    rb.start(obs)
    for _ in range(1000):
        obs = rng.integers(0, 120, (1, 2, args.image_size, args.image_size), dtype=np.uint8)
        rb.add(rng.uniform(-1, 1, (1, 5)).astype(np.float32), rng.integers(0, 2, 1).astype(np.float32),
               rng.integers(0, 2, 1).astype(bool), np.ones(1, bool), obs, expert=rng.integers(0, 2, 1).astype(bool))
    return {
        "actor": actor, "critic": critic, "critic_target": critic_target, "rb": rb,
        "actor_opt": torch.optim.Adam(actor.parameters(), lr=1e-3),
        "critic_opt": torch.optim.Adam(critic.parameters(), lr=1e-3),
        "log_alpha": torch.tensor([math.log(0.01)], device=device, requires_grad=True),
    }


def gradient_step(s, args, device, variant, now):
    """One SAC(fD) gradient step; returns seconds per phase."""
    actor, critic, critic_target = s["actor"], s["critic"], s["critic_target"]
    alpha = s["log_alpha"].exp().item()
    times, t = {}, now()
    data = sac.augment(s["rb"].sample(args.batch_size, device), args.aug_copies)
    if variant == "ours":
        for key in ("obs", "next_obs"):
            data[key] = data[key].contiguous(memory_format=torch.channels_last)
    times["sample"], t = now() - t, now()

    with torch.no_grad():
        next_mean, next_log_std = actor(data["next_obs"])
        next_actions, next_log_pi = sac.sample_action(next_mean, next_log_std)
        qf1_next, qf2_next = critic_target(data["next_obs"], next_actions)
        min_qf_next = torch.min(qf1_next, qf2_next) - alpha * next_log_pi
        next_q = data["rewards"] + (1 - data["terminated"]) * args.gamma * min_qf_next
    times["target"], t = now() - t, now()

    features = critic.encode(data["obs"])
    qf1, qf2 = critic.q_values(features, data["actions"])
    qf_loss = F.mse_loss(qf1, next_q) + F.mse_loss(qf2, next_q)
    s["critic_opt"].zero_grad()
    qf_loss.backward()
    s["critic_opt"].step()
    times["critic"], t = now() - t, now()

    mean, log_std = actor(data["obs"])
    pi, log_pi = sac.sample_action(mean, log_std)
    if variant in ("reuse", "ours"):
        qf1_pi, qf2_pi = critic.q_values(features.detach(), pi)
    else:  # the whole critic again, encoder included
        qf1_pi, qf2_pi = critic(data["obs"], pi)
    actor_loss = (alpha * log_pi - torch.min(qf1_pi, qf2_pi)).mean()
    expert = data["expert"]
    if expert.any():
        actor_loss = actor_loss + F.mse_loss(pi[expert], data["actions"][expert])
    s["actor_opt"].zero_grad()
    actor_loss.backward()
    s["actor_opt"].step()
    alpha_loss = (-s["log_alpha"].exp() * (log_pi.detach() - 5.0)).mean()
    alpha_loss.backward()
    times["actor"], t = now() - t, now()

    with torch.no_grad():
        for param, target_param in zip(critic.parameters(), critic_target.parameters()):
            target_param.lerp_(param, args.tau)
    times["polyak"] = now() - t
    times["total"] = sum(times.values())
    return times


def plot(path):
    """Stacked bars: seconds per gradient step by phase, per model and variant, from results `path` (.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        info = json.load(f)
    rows, phases = info["rows"], ("sample", "target", "critic", "actor", "polyak")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"{r['model']}\n{r['variant']}" for r in rows]
    bottom = np.zeros(len(rows))
    for phase in phases:
        values = np.array([r[phase] for r in rows])
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom += values
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['total']:.1f}", ha="center", va="bottom", fontsize=8)
    c = info["config"]
    ax.set_ylabel("seconds per gradient step (median)")
    ax.set_title(f"SAC update, C{c['group_order']} n_hidden {c['n_hidden']}, {c['image_size']}px, batch "
                 f"{c['batch_size']} | {info['hardware']}, load {info['load_average'][0]:.1f}, {info['date']}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(companion(path, ".png"), dpi=110)


def main():
    opts = cli(Args, __doc__)
    path = results_path(opts, f"sac_update_time_{opts.device.split(':')[0]}.json", (".csv", ".png"))
    if opts.plot_only:
        plot(path)
        return
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rows = []
    for model in opts.models.split(","):
        args = sac.Args(model=model, group_order=opts.group_order, n_hidden=opts.n_hidden, image_size=opts.image_size,
                        batch_size=opts.batch_size)
        build_start = time.perf_counter()
        setup = make_setup(args, device)
        build_seconds = time.perf_counter() - build_start
        params = count_parameters(setup["actor"]) + count_parameters(setup["critic"])
        for variant in opts.variants.split(","):
            now = timer(device)
            gradient_step(setup, args, device, variant, now)  # warm-up (allocator, oneDNN/cuDNN plans)
            steps = [gradient_step(setup, args, device, variant, now) for _ in range(opts.repeats)]
            row = {"model": model, "variant": variant, "params": params, "build_seconds": round(build_seconds, 2)}
            for phase in steps[0]:
                row[phase] = float(np.median([st[phase] for st in steps]))
            row["total_min"] = float(min(st["total"] for st in steps))
            rows.append(row)
            print(f"{model:4s} {variant:15s} " + " ".join(f"{k} {row[k]:.3f}" for k in
                  ("sample", "target", "critic", "actor", "polyak", "total")) + " (median s)", flush=True)
    info = {
        "date": time.strftime("%Y-%m-%d"), "device": str(device),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{cpu_model()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "load_average": os.getloadavg(), "torch": torch.__version__, "machine": machine_info(str(device)),
        "config": {k: getattr(opts, k) for k in ("group_order", "n_hidden", "image_size", "batch_size", "repeats")},
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    with open(companion(path, ".csv"), "w") as f:
        keys = list(rows[0])
        f.write(",".join(keys) + "\n")
        for row in rows:
            f.write(",".join(str(row[k]) for k in keys) + "\n")
    plot(path)
    print(f"wrote {path} and its .csv/.png")


if __name__ == "__main__":
    main()
