"""Learning curves of sac_equi_bullet.py: run tasks x models x seeds, then tabulate and plot the evaluations.

Runs the training script once per (task, model, seed) as a user would (its own process, its TensorBoard run under
--runs-dir), then reads every run's eval/success_rate and eval/discounted_return against gradient steps, and
writes benchmarks/results/sac_learning<tag>.{json,csv,png}: mean and spread over seeds per (task, experiment), the
first gradient step and wall time at which the seed-mean success reached --target, and the hardware.

    # the paper's comparison on a GPU node (equivariant vs CNN, Block Pulling, 3 seeds, 2.5k+ gradient steps)
    uv run python benchmarks/sac_learning.py --device cuda --tasks BlockPulling --models equi,cnn --seeds 1,2,3 \\
        --total-timesteps 25000 --parallel 3 --tag _gpu
    # only tabulate / plot runs that already exist (any runs folder written by sac_equi_bullet.py)
    uv run python benchmarks/sac_learning.py --collect-only --runs-dir /tmp/sac_learn --tag _cpu
    # a tiny check that writes nowhere near the committed results
    uv run python benchmarks/sac_learning.py --device cpu --models cnn --seeds 1 --total-timesteps 100 \\
        --eval-frequency 10 --eval-episodes 1 --runs-dir /tmp/sac_check --out /tmp/sac_check/sac_learning.json \\
        -- --num-demos 1 --group-order 4 --n-hidden 16 --image-size 64 --batch-size 32
Extra flags after `--` go to every training run (e.g. `-- --group-order 4 --n-hidden 16 --image-size 64`). The runs go
--parallel at a time, each one's output in <runs-dir>/runs/<task>_<experiment>_<seed>.log. Existing results are
replaced only when --out names them or with --overwrite.
"""

import glob
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (REPO, Job, Launch, Output, cli, companion, device_flags, fail, machine_info, results_path,  # noqa: E402
                    run_jobs, thread_env)


@dataclass
class Args(Output, Launch):
    tasks: str = "BlockPulling"
    """comma-separated manipulation tasks"""
    models: str = "equi,cnn"
    """comma-separated models: equi, cnn"""
    seeds: str = "1,2,3"
    """comma-separated seeds"""
    total_timesteps: int = 25000
    """env steps per run (5 envs: 5k gradient steps)"""
    eval_frequency: int = 250
    """gradient steps between evaluations (the script's --eval-frequency)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    exp_prefix: str = "sac"
    """experiment names are <prefix>_<model>"""
    runs_dir: str = os.path.join(REPO, "benchmarks", "sac_runs")
    """folder of the runs (runs/, with one .log per run)"""
    collect_only: bool = False
    """skip training; tabulate the runs already in --runs-dir"""
    target: float = 0.9
    """success rate whose first crossing (seed mean) is reported"""
    hardware: str = ""
    """hardware description for the results (default: detected)"""
    last_evals: int = 4
    """evaluations at the end of a run averaged for the "last" figures (a single last evaluation hides a collapse)"""
    dynamics: bool = False
    """also plot each seed's training dynamics (alpha, Q values against the evaluations' discounted return, critic
    loss, policy entropy and standard deviation) to <out>_dynamics.png, their curves in the JSON"""


def run_all(opts, extra):
    """Run the training runs, at most --parallel at a time; each one's output goes to <runs-dir>/runs/<name>.log."""
    jobs = []
    for task in opts.tasks.split(","):
        for model in opts.models.split(","):
            for seed in opts.seeds.split(","):
                name = f"{opts.exp_prefix}_{model}"
                cmd = [sys.executable, os.path.join(REPO, "sac_equi_bullet.py"), "--env-id",
                       f"cleanrl_equi/{task}-v0", "--model", model, "--seed", seed, "--exp-name", name,
                       "--total-timesteps", str(opts.total_timesteps), "--eval-frequency", str(opts.eval_frequency),
                       "--eval-episodes", str(opts.eval_episodes), *device_flags(opts.device), *extra]
                log = os.path.join(opts.runs_dir, "runs", f"{task}_{name}_{seed}.log")  # beside the runs (git-ignored)
                jobs.append(Job(f"{task} {name} seed {seed}", cmd, log, opts.runs_dir, thread_env(opts.threads)))
    run_jobs(jobs, opts.parallel, hint="--collect-only tabulates the runs that finished")


DYNAMICS = ("eval/success_rate", "eval/discounted_return", "losses/alpha", "losses/qf1_values", "losses/qf_loss",
            "losses/entropy", "losses/policy_std", "losses/actor_loss")


def read_runs(runs_dir):
    """{(env_id, exp_name): {seed: {"steps": [...], "success": [...], "return": [...], "wall": [...]}}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = defaultdict(dict)
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "**", "runs", "*__*__*__*"), recursive=True)):
        env_id, exp_name, seed, _ = os.path.basename(run_dir).split("__")
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "eval/success_rate" not in tags:
            continue
        start = min(e.wall_time for tag in tags for e in acc.Scalars(tag)[:1])
        runs[(env_id, exp_name)][int(seed)] = {
            "dynamics": {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in DYNAMICS if tag in tags},
            "steps": [int(e.value) for e in acc.Scalars("eval/gradient_steps")],
            "success": [e.value for e in acc.Scalars("eval/success_rate")],
            "return": [e.value for e in acc.Scalars("eval/discounted_return")],
            "smoothness": [e.value for e in acc.Scalars("eval/action_smoothness")],
            "wall": [e.wall_time - start for e in acc.Scalars("eval/success_rate")],
        }
    return runs


def summarise(runs, target, last_evals):
    summary = []
    for (env_id, exp_name), seeds in sorted(runs.items()):
        n = min(len(r["steps"]) for r in seeds.values())
        steps = list(seeds.values())[0]["steps"][:n]
        success = np.array([r["success"][:n] for r in seeds.values()])
        returns = np.array([r["return"][:n] for r in seeds.values()])
        wall = np.array([r["wall"][:n] for r in seeds.values()])
        mean = success.mean(0)
        # TensorBoard keeps float32: 45 of 50 successes read 0.89999998, which is 0.9
        reached = [i for i in range(n) if mean[i] >= target - 1e-6]
        summary.append({
            "env_id": env_id, "experiment": exp_name, "seeds": sorted(seeds), "gradient_steps": steps,
            "success_mean": mean.tolist(), "success_std": success.std(0).tolist(),
            "return_mean": returns.mean(0).tolist(), "return_std": returns.std(0).tolist(),
            "final_success": float(mean[-1]), "best_success": float(mean.max()),
            "last_evals": min(last_evals, n), "last_success": float(success[:, -last_evals:].mean()),
            "last_return": float(returns[:, -last_evals:].mean()),
            "per_seed_success": {s: r["success"][:n] for s, r in seeds.items()},
            "per_seed_last_success": {s: float(np.mean(r["success"][:n][-last_evals:])) for s, r in seeds.items()},
            "per_seed_best_success": {s: float(max(r["success"][:n])) for s, r in seeds.items()},
            "first_step_at_target": steps[reached[0]] if reached else None,
            "wall_seconds_at_target": float(wall[:, reached[0]].mean()) if reached else None,
            "wall_seconds_total": float(wall[:, -1].mean()),
            "per_seed_first_step_at_target": {
                s: next((st for st, v in zip(r["steps"], r["success"]) if v >= target - 1e-6), None)
                for s, r in seeds.items()},
        })
    return summary


def plot(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({s["env_id"] for s in summary})
    fig, axes = plt.subplots(len(envs), 2, figsize=(10, 3.4 * len(envs)), squeeze=False)
    for row, env_id in enumerate(envs):
        for s in (s for s in summary if s["env_id"] == env_id):
            for col, key in enumerate(("success", "return")):
                mean, std = np.array(s[f"{key}_mean"]), np.array(s[f"{key}_std"])
                ax = axes[row, col]
                line, = ax.plot(s["gradient_steps"], mean, label=f"{s['experiment']} ({len(s['seeds'])} seeds)")
                ax.fill_between(s["gradient_steps"], mean - std, mean + std, alpha=0.2)
                if key == "success":  # every seed, thin: a mean can hide one seed's collapse
                    for curve in s["per_seed_success"].values():
                        ax.plot(s["gradient_steps"], curve, color=line.get_color(), lw=0.6, alpha=0.5)
                ax.set_ylim(-0.02, 1.02)
                ax.set_xlabel("gradient steps")
                ax.set_ylabel("eval success rate" if key == "success" else "eval discounted return")
                ax.set_title(env_id.replace("cleanrl_equi_", ""))
                ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_dynamics(runs, path, title):
    """One row per (task, experiment), one line per seed: eval success, alpha, the batch's mean Q (with the
    evaluations' discounted return, what Q should approach), critic loss, policy entropy and standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("eval/success_rate", "eval success"), ("losses/alpha", "alpha"),
              ("losses/qf1_values", "mean Q1 (dashed: eval disc. return)"), ("losses/qf_loss", "critic loss"),
              ("losses/entropy", "policy entropy"), ("losses/policy_std", "policy std"))
    keys = sorted(runs)
    fig, axes = plt.subplots(len(keys), len(panels), figsize=(3.2 * len(panels), 2.8 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        for seed, run in sorted(runs[key].items()):
            for col, (tag, label) in enumerate(panels):
                ax = axes[row, col]
                points = np.array(run["dynamics"].get(tag, [])).reshape(-1, 2)
                line, = ax.plot(points[:, 0], points[:, 1], lw=0.8, label=f"seed {seed}")
                if tag == "losses/qf1_values":
                    returns = np.array(run["dynamics"].get("eval/discounted_return", [])).reshape(-1, 2)
                    ax.plot(returns[:, 0], returns[:, 1], "--", color=line.get_color(), lw=0.8)
                if tag in ("losses/qf_loss", "losses/alpha"):
                    ax.set_yscale("log")
                ax.set_title(f"{key[0].replace('cleanrl_equi_', '')} {key[1]}: {label}", fontsize=7)
                ax.set_xlabel("env steps", fontsize=7)
                ax.tick_params(labelsize=6)
                ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    opts, extra = cli(Args, __doc__, passthrough=True)
    opts.runs_dir = os.path.abspath(opts.runs_dir)
    if opts.last_evals < 1:
        fail("--last-evals must be at least 1 (the evaluations averaged at the end of a run).")
    path = results_path(opts, "sac_learning.json", (".csv", ".png") + (("_dynamics.png",) if opts.dynamics else ()))
    if not opts.collect_only:
        run_all(opts, extra)
    runs = read_runs(opts.runs_dir)
    if not runs:
        raise SystemExit(f"no runs with evaluations under {opts.runs_dir}/runs")
    summary = summarise(runs, opts.target, opts.last_evals)
    machine = machine_info(opts.device)
    hardware = opts.hardware or machine.get("gpu") or f"{machine['cpu']}, {os.cpu_count()} cores"
    info = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware, "target": opts.target,
            "extra_flags": extra, "machine": machine, "results": summary}
    if opts.dynamics:
        info["dynamics"] = [{"env_id": env_id, "experiment": name, "seed": seed, "curves": run["dynamics"]}
                            for (env_id, name), seeds in sorted(runs.items()) for seed, run in sorted(seeds.items())]
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    with open(companion(path, ".csv"), "w") as f:
        f.write("env_id,experiment,seeds,final_success,best_success,last_evals,last_success,first_step_at_target,"
                "wall_seconds_at_target,wall_seconds_total\n")
        for s in summary:
            f.write(f"{s['env_id']},{s['experiment']},{len(s['seeds'])},{s['final_success']:.3f},{s['best_success']:.3f},"
                    f"{s['last_evals']},{s['last_success']:.3f},{s['first_step_at_target']},"
                    f"{s['wall_seconds_at_target']},{s['wall_seconds_total']:.0f}\n")
    plot(summary, companion(path, ".png"), f"sac_equi_bullet.py, {hardware}, {info['date']}")
    if opts.dynamics:
        plot_dynamics(runs, companion(path, "_dynamics.png"), f"sac_equi_bullet.py, {hardware}, {info['date']}")
    for s in summary:
        print(f"{s['env_id']} {s['experiment']}: seeds {s['seeds']} final {s['final_success']:.2f} last "
              f"{s['last_evals']} evaluations {s['last_success']:.2f} best "
              f"{s['best_success']:.2f} first >= {opts.target} at {s['first_step_at_target']} steps "
              f"({s['wall_seconds_at_target']} s)")
    print(f"wrote {path} and its .csv/.png")


if __name__ == "__main__":
    main()
