"""What the smooth-motion and gentle-contact priors cost and buy: Equi SAC per task x prior x seed.

Trains sac_equi_bullet.py once per (task, setting, seed) as a user would, then reads every run's evaluations
(success rate, discounted return and the smoothness and gentleness metrics of
cleanrl_equi/envs/manipulation/metrics.py, each the mean over the evaluation's episodes): a run's figures are the
means over its last --last-evals evaluations (one last evaluation cannot tell a prior's effect from a collapse), with
its best success and its final Lagrange multiplier beside them. Writes
benchmarks/results/smooth_gentle_study<tag>.{json,csv,png} and <tag>_curves.png: one row per run, the mean and spread
over seeds per (task, setting), whether a setting reached the target (success within 0.05 of no prior's, peak grip
force <= 2x and jerk <= 10x the planner's), a Pareto plot (success vs peak grip force and vs jerk, one point per
run, the planner marked) and every run's success curve.

A study too long for one sitting grows across sittings: `--keep <earlier results .json>` keeps that file's runs
and trains only the (task, setting, seed) runs it lacks.

    # the committed CPU study (CPU preset; BulletArm's env setting, as the CPU learning benchmarks)
    uv run python benchmarks/smooth_gentle_study.py --tasks BlockPulling,DrawerOpening --seeds 1,2 --parallel 2 \\
        -- --group-order 4 --n-hidden 16 --image-size 64 --batch-size 32 --workspace-size 0.3 --drot-n 4 \\
        --max-steps 50 --no-paper-tasks
    # only tabulate runs that exist
    uv run python benchmarks/smooth_gentle_study.py --collect-only --runs-dir benchmarks/gentle_runs

Settings (--settings, comma-separated): base (no prior), caps<w> (CAPS temporal and spatial weight w, e.g. caps0.1),
force<w> (force penalty w above 20 N, e.g. force0.1), arate<w> (action-rate penalty w), lagrange<b> (constrained
SAC: grip-force cost above 20 N, episode budget b: --cost-limit b), lagrange_ep<b> (the same, lambda weighing the
measured training episodes' cost against b: --lambda-update episodes), filter<tau> (the env's action filter with
time constant tau: --action-filter-tau tau), adv<w> (adversarial smoothness weight w), cnn (the plain CNN, no
prior), bf16 (no prior, bfloat16 mixed precision: --bf16); "+" joins settings (filter0.1+lagrange1).

    # the study of the constrained SAC, the action filter and adversarial smoothness (3 seeds; grows with --keep)
    uv run python benchmarks/smooth_gentle_study.py --tasks BlockPulling,DrawerOpening,BlockPicking --seeds 1,2,3 \\
        --settings base,force0.1,lagrange1,lagrange5,filter0.1,filter0.1+lagrange5,adv0.1 --total-timesteps 20000 \\
        --eval-frequency 250 --parallel 2 --tag _constrained --overwrite \\
        --keep benchmarks/results/smooth_gentle_study_constrained.json -- --group-order 4 --n-hidden 16 \\
        --image-size 64 --batch-size 32 --workspace-size 0.3 --drot-n 4 --max-steps 50 --no-paper-tasks
    # with the Kuka arm (joint jerk and torque are read too): no prior and three priors that gave gentle successes
    uv run python benchmarks/smooth_gentle_study.py --tasks BlockPulling --seeds 1 \\
        --settings base,force0.1,lagrange5,adv0.1 --total-timesteps 20000 --eval-frequency 250 --parallel 2 \\
        --tag _kuka --overwrite --keep benchmarks/results/smooth_gentle_study_kuka.json \\
        --runs-dir benchmarks/gentle_kuka_runs -- --group-order 4 --n-hidden 16 --image-size 64 --batch-size 32 \\
        --workspace-size 0.3 --drot-n 4 --max-steps 50 --no-paper-tasks --robot kuka
    # the CNN at five times the budget (100k env steps = 20k gradient steps)
    uv run python benchmarks/smooth_gentle_study.py --tasks BlockPulling --seeds 1 --settings cnn \\
        --total-timesteps 100000 --eval-frequency 1000 --tag _cnn_long --runs-dir benchmarks/gentle_cnn_runs \\
        -- --group-order 4 --n-hidden 16 --image-size 64 --batch-size 32 --workspace-size 0.3 --drot-n 4 \\
        --max-steps 50 --no-paper-tasks
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
from common import (REPO, Job, Launch, Output, cli, companion, device_flags, fail, load_script, machine_info,  # noqa: E402
                    results_path, run_jobs, thread_env)
# JOINT_METRICS, the arm's joint motion (--robot kuka|panda; 0 for the floating gripper): runs kept from before these
# were read lack them, so they are read where a run logged them and averaged over the runs that have them.
from cleanrl_equi.envs.manipulation.metrics import JOINT_METRICS  # noqa: E402

METRICS = ("success_rate", "discounted_return", "episode_length", "action_smoothness", "action_change",
           "path_length", "peak_speed", "mean_squared_jerk", "peak_grip_force", "mean_grip_force", "contact_impulse",
           "peak_impact_force", "peak_object_acceleration", "drops")


@dataclass
class Args(Output, Launch):
    tasks: str = "BlockPulling,DrawerOpening"
    """comma-separated manipulation tasks"""
    settings: str = "base,caps0.1,caps1,force0.1,cnn"
    """comma-separated settings (see the module docstring)"""
    seeds: str = "1,2"
    """comma-separated seeds"""
    total_timesteps: int = 12500
    """env steps per run (5 envs: 2.5k gradient steps)"""
    eval_frequency: int = 500
    """gradient steps between evaluations"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    runs_dir: str = os.path.join(REPO, "benchmarks", "gentle_runs")
    """folder of the runs (runs/, with one .log per run)"""
    collect_only: bool = False
    """skip training; tabulate the runs already in --runs-dir"""
    planner_episodes: int = 50
    """episodes of each task's planner measured as a reference (the same env settings as the runs; 0 = none)"""
    last_evals: int = 4
    """evaluations at the end of a run whose mean is the run's figure"""
    keep: str = ""
    """an earlier results .json of this benchmark: its runs are kept, and only the runs it lacks are trained"""


def setting_flags(setting: str) -> list[str]:
    """The training flags of one setting name ("+" joins several)."""
    if "+" in setting:
        return [flag for part in setting.split("+") for flag in setting_flags(part)]
    if setting.startswith("lagrange_ep"):
        budget = setting.removeprefix("lagrange_ep")
        if not budget.replace(".", "", 1).isdigit():
            fail(f"setting {setting!r} needs a budget after 'lagrange_ep', e.g. lagrange_ep5.")
        return ["--cost-limit", str(float(budget)), "--lambda-update", "episodes"]
    for prefix, flags in (("caps", ("--caps-temporal-weight", "--caps-spatial-weight")),
                          ("force", ("--force-penalty",)), ("arate", ("--action-rate-penalty",)),
                          ("lagrange", ("--cost-limit",)),
                          ("filter", ("--action-filter-tau",)), ("adv", ("--smooth-adversarial-weight",))):
        if setting.startswith(prefix):
            try:
                weight = float(setting[len(prefix):])
            except ValueError:
                fail(f"setting {setting!r} needs a weight after {prefix!r}, e.g. {prefix}0.1.")
            return [item for flag in flags for item in (flag, str(weight))]
    if setting == "base":
        return []
    if setting == "cnn":
        return ["--model", "cnn"]
    if setting == "bf16":
        return ["--bf16"]
    fail(f"unknown setting {setting!r}; use base, cnn, bf16, caps<w>, force<w>, arate<w>, lagrange<b>, "
         f"lagrange_ep<b>, filter<tau> or adv<w>, joined by '+'.")


def run_all(opts, extra, done):
    jobs = []
    for task in opts.tasks.split(","):
        for setting in opts.settings.split(","):
            flags = setting_flags(setting)
            for seed in opts.seeds.split(","):
                if (task, setting, int(seed)) in done:
                    continue
                cmd = [sys.executable, os.path.join(REPO, "sac_equi_bullet.py"), "--env-id", f"cleanrl_equi/{task}-v0",
                       "--seed", seed, "--exp-name", f"gentle_{setting}", "--total-timesteps",
                       str(opts.total_timesteps), "--eval-frequency", str(opts.eval_frequency), "--eval-episodes",
                       str(opts.eval_episodes), *device_flags(opts.device), *flags, *extra]
                log = os.path.join(opts.runs_dir, "runs", f"{task}_{setting}_{seed}.log")
                jobs.append(Job(f"{task} {setting} seed {seed}", cmd, log, opts.runs_dir, thread_env(opts.threads)))
    run_jobs(jobs, opts.parallel, hint="--collect-only tabulates the runs that finished")


def read_runs(runs_dir, last_evals):
    """One row per run: task, setting, seed, the gradient steps, every metric as the mean of its last `last_evals`
    evaluations, its best success, the final lambda (constrained runs) and its success curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "runs", "*__gentle_*__*__*"))):
        env_id, exp_name, seed, _ = os.path.basename(run_dir).split("__")
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "eval/success_rate" not in tags or not all(f"eval/{m}" in tags for m in METRICS):
            continue
        steps = [int(e.value) for e in acc.Scalars("eval/gradient_steps")]
        row = {"task": env_id.removeprefix("cleanrl_equi_").removesuffix("-v0"),
               "setting": exp_name.removeprefix("gentle_"), "seed": int(seed), "gradient_steps": steps[-1],
               "last_evals": min(last_evals, len(steps))}
        row.update({m: float(np.mean([e.value for e in acc.Scalars(f"eval/{m}")[-last_evals:]]))
                    for m in (*METRICS, *JOINT_METRICS) if f"eval/{m}" in tags})
        success = [float(e.value) for e in acc.Scalars("eval/success_rate")]
        row["best_success"] = max(success)
        row["final_lambda"] = float(acc.Scalars("charts/lambda")[-1].value) if "charts/lambda" in tags else 0.0
        row["curve"] = [steps, success]
        rows.append(row)
    return rows


def planner_rows(tasks, episodes, extra):
    """The planner's metrics per task, in the env settings the runs used (read from the flags after `--`)."""
    import tyro

    sac = load_script("sac_equi_bullet")
    rows = []
    for task in tasks:
        args = tyro.cli(sac.Args, args=["--env-id", f"cleanrl_equi/{task}-v0", *extra])
        envs = sac.make_envs(args, 1)
        envs.reset(seed=12345)
        finished, length = [], 0
        while len(finished) < episodes:
            _, _, terminated, truncated, infos = envs.step(np.stack(envs.unwrapped.call("expert_action")))
            length += 1
            if terminated[0] or truncated[0]:
                success = bool(infos["is_success"][0])
                finished.append({m: float(infos[m][0]) for m in (*METRICS, *JOINT_METRICS) if m in infos} |
                                {"success_rate": float(success), "episode_length": float(length),
                                 "discounted_return": args.gamma ** (length - 1) if success else 0.0})
                length = 0
                envs.step(np.zeros((1, 5), dtype=np.float32))  # the autoreset step (its action is ignored)
        envs.close()
        row = {"task": task, "setting": "planner", "seed": 0, "gradient_steps": 0, "last_evals": 1}
        row.update({m: float(np.mean([f.get(m, np.nan) for f in finished])) for m in (*METRICS, *JOINT_METRICS)})
        row.update(best_success=row["success_rate"], final_lambda=0.0, curve=[[], []])
        rows.append(row)
    return rows


def summarise(rows):
    groups = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["setting"])].append(row)
    summary = []
    for (task, setting), group in sorted(groups.items()):
        entry = {"task": task, "setting": setting, "seeds": sorted(r["seed"] for r in group)}
        for m in (*METRICS, *JOINT_METRICS, "best_success", "final_lambda"):
            values = np.array([r[m] for r in group if m in r])
            if values.size == 0:
                continue
            entry[m] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
        summary.append(entry)
    return summary


def target_check(summary):
    """Per task, each setting against the target: success within 0.05 of no prior's (base), peak grip force at most
    2x and mean squared jerk at most 10x the planner's (seed means)."""
    by_key = {(s["task"], s["setting"]): s for s in summary}
    checks = []
    for (task, setting), entry in sorted(by_key.items()):
        base, planner = by_key.get((task, "base")), by_key.get((task, "planner"))
        if setting in ("base", "planner") or base is None or planner is None:
            continue
        success, force, jerk = (entry[m]["mean"] for m in ("success_rate", "peak_grip_force", "mean_squared_jerk"))
        checks.append({
            "task": task, "setting": setting, "seeds": len(entry["seeds"]),
            "success_vs_base": success - base["success_rate"]["mean"],
            "force_vs_planner": force / max(planner["peak_grip_force"]["mean"], 1e-9),
            "jerk_vs_planner": jerk / max(planner["mean_squared_jerk"]["mean"], 1e-9),
        })
        check = checks[-1]
        check["reached"] = bool(success > 0 and check["success_vs_base"] >= -0.05 and check["force_vs_planner"] <= 2
                                and check["jerk_vs_planner"] <= 10)  # never succeeding is not a gentle success
    return checks


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    settings = sorted({r["setting"] for r in rows} - {"planner"}) + ["planner"]
    markers = dict(zip(settings, "osD^vPXdhp<>"))
    markers["planner"] = "*"
    fig, axes = plt.subplots(len(tasks), 3, figsize=(14, 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for setting in settings:
            group = [r for r in rows if r["task"] == task and r["setting"] == setting]
            for j, metric in enumerate(("action_smoothness", "mean_squared_jerk", "peak_grip_force")):
                axes[i, j].scatter([r[metric] for r in group], [r["success_rate"] for r in group],
                                   marker=markers[setting], s=160 if setting == "planner" else 50, label=setting,
                                   color="black" if setting == "planner" else None)
        for j, (metric, unit) in enumerate((("action_smoothness", "CAPS Sm, lower is smoother"),
                                            ("mean_squared_jerk", "m^2/s^6"), ("peak_grip_force", "N"))):
            axes[i, j].set_xlabel(f"{metric} ({unit})")
            if metric == "mean_squared_jerk":  # spans 1e3 (a gentle push) to 1e7 (pressing into the table)
                axes[i, j].set_xscale("symlog", linthresh=1e3)
            axes[i, j].set_ylabel("eval success rate")
            axes[i, j].set_title(task)
            axes[i, j].grid(alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_curves(rows, path, title):
    """Every run's evaluation success over gradient steps, one panel per (task, setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r["setting"] != "planner"]
    tasks = sorted({r["task"] for r in runs})
    settings = sorted({r["setting"] for r in runs})
    fig, axes = plt.subplots(len(tasks), len(settings), figsize=(2.6 * len(settings), 2.3 * len(tasks)),
                             squeeze=False, sharey=True)
    for i, task in enumerate(tasks):
        for j, setting in enumerate(settings):
            ax = axes[i, j]
            for r in (r for r in runs if r["task"] == task and r["setting"] == setting):
                ax.plot(*r["curve"], lw=0.9, label=f"seed {r['seed']}")
            ax.set_title(f"{task} {setting}", fontsize=7)
            ax.set_ylim(-0.02, 1.02)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    opts, extra = cli(Args, __doc__, passthrough=True)
    opts.runs_dir = os.path.abspath(opts.runs_dir)
    for setting in opts.settings.split(","):
        setting_flags(setting)
    if opts.last_evals < 1:
        fail("--last-evals must be at least 1 (the evaluations averaged at the end of a run).")
    kept = []
    if opts.keep:
        try:
            with open(opts.keep) as f:
                kept = [r for r in json.load(f)["runs"] if r["setting"] != "planner"]
        except (OSError, ValueError, KeyError) as error:
            fail(f"--keep {opts.keep}: not a results file of this benchmark ({error}).")
        if any("curve" not in r for r in kept):
            fail(f"--keep {opts.keep}: its runs were read before this benchmark kept curves; start a new study.")
    path = results_path(opts, "smooth_gentle_study.json", (".csv", ".png", "_curves.png"))
    done = {(r["task"], r["setting"], r["seed"]) for r in kept}
    if not opts.collect_only:
        run_all(opts, extra, done)
    new_runs = read_runs(opts.runs_dir, opts.last_evals)
    rows = kept + [r for r in new_runs if (r["task"], r["setting"], r["seed"]) not in done]
    if not rows:
        fail(f"no finished runs with evaluations under {opts.runs_dir}/runs")
    if opts.planner_episodes > 0:
        rows += planner_rows(sorted({r["task"] for r in rows}), opts.planner_episodes, extra)
    machine = machine_info(opts.device)
    info = {"date": time.strftime("%Y-%m-%d"), "hardware": f"{machine['cpu']}, {os.cpu_count()} cores",
            "total_timesteps": opts.total_timesteps, "eval_episodes": opts.eval_episodes, "extra_flags": extra,
            "last_evals": opts.last_evals, "machine": machine, "runs": rows, "summary": summarise(rows)}
    info["target"] = target_check(info["summary"])
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    with open(companion(path, ".csv"), "w") as f:
        columns = ["task", "setting", "seed", "gradient_steps", "last_evals", *METRICS, "best_success", "final_lambda",
                   *JOINT_METRICS]
        f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(k, "")) for k in columns) + "\n")
    plot(rows, companion(path, ".png"), f"sac_equi_bullet.py, mean of the last {opts.last_evals} evaluations per run, "
                                        f"{info['hardware']}, {info['date']}")
    plot_curves(rows, companion(path, "_curves.png"), f"sac_equi_bullet.py, evaluation success per run, {info['date']}")
    for s in info["summary"]:
        print(f"{s['task']:14s} {s['setting']:9s} seeds {s['seeds']} success {s['success_rate']['mean']:.2f} "
              f"Sm {s['action_smoothness']['mean']:.3f} jerk {s['mean_squared_jerk']['mean']:.3g} "
              f"peak grip {s['peak_grip_force']['mean']:.1f} N drops {s['drops']['mean']:.2f}"
              + (f" joint jerk {s['mean_squared_joint_jerk']['mean']:.3g} peak torque "
                 f"{s['peak_joint_torque']['mean']:.1f} N m" if s.get("peak_joint_torque", {}).get("mean") else ""))
    for c in info["target"]:
        print(f"{c['task']:14s} {c['setting']:20s} success {c['success_vs_base']:+.2f} vs no prior, peak grip "
              f"{c['force_vs_planner']:.1f}x and jerk {c['jerk_vs_planner']:.1f}x the planner's: "
              f"{'target reached' if c['reached'] else 'not reached'}")
    print(f"wrote {path} and its .csv/.png/_curves.png")


if __name__ == "__main__":
    main()
