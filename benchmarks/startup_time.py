"""Start-up time of the training scripts, two checkouts side by side: seconds from launching a script to its first
training step, and to its first line of output.

Every training script is run as a user runs it, `python <checkout>/<script>.py <flags>` in an empty working folder
with OMP_NUM_THREADS=1, its stdout on a terminal (a pseudo-terminal, so Python line-buffers it as it would for a
user), the checkout's root first on PYTHONPATH (so its own `cleanrl_equi` is imported, not the installed one).
Neither checkout is edited: a `sitecustomize.py` on PYTHONPATH wraps `torch.optim.Optimizer.zero_grad` so that its
first call writes `time.time()` to a marker file and ends the process (`os._exit(0)`). Every script calls
`zero_grad` right before its first backward pass, so that moment is "the first training step": the first loss has
been computed. The first line of stdout (new scripts print their run directory at once) is timed too.

Two bytecode conditions:
  nocache   PYTHONPYCACHEPREFIX is a fresh empty folder and PYTHONDONTWRITEBYTECODE=1: every .py of the project and
            of its dependencies is compiled at start, as on the first run after a `uv sync` that did not compile
            bytecode, or on a read-only environment;
  compiled  PYTHONPYCACHEPREFIX is a folder filled by one warm-up run of the same script, configuration and checkout.

Configurations: `defaults` (each script's defaults; sac/cql/iql: C8, n_hidden 64, 128 px) and `cpu` (the CPU
presets: sac `--group-order 4 --n-hidden 16 --image-size 64 --batch-size 32`, cql/iql the same plus
`--policy-lr 3e-4 --q-lr 3e-4`; the PPO scripts and rpo_mujoco.py have no preset). cql/iql build their default
dataset once under $CLEANRL_EQUI_DATA, which points at a folder of this run that the warm-up runs fill (the same file
for both checkouts), so no measured run builds a dataset.

Runs are interleaved: for each repeat, every (script, configuration, condition) runs once per checkout, the order of
the checkouts alternating between repeats (ABBA), so both see the same machine load. The load average is recorded
at each launch. Results: benchmarks/results/startup_time<tag>.{json,csv} (median, min and max per checkout, script,
configuration and condition) with the hardware, date, load and both checkouts' commits.

    git worktree add /tmp/before b5f5ce1
    uv run python benchmarks/startup_time.py --before /tmp/before
    uv run python benchmarks/startup_time.py --before /tmp/before --scripts ppo_atari --configs defaults \\
        --conditions compiled --repeats 1 --out /tmp/startup_check.json
"""

from __future__ import annotations

import csv
import json
import os
import pty
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Output, cli, companion, fail, load_average, log_tail, machine_info, results_path  # noqa: E402

SCRIPTS = ("ppo_atari", "ppo_atari_equi", "rpo_mujoco", "sac_equi_bullet", "cql_equi_offline", "iql_equi_offline")
SAC_CPU = ["--group-order", "4", "--n-hidden", "16", "--image-size", "64", "--batch-size", "32"]
PRESETS = {  # script -> configuration -> flags (a script without a configuration is not run in it)
    "ppo_atari": {"defaults": []},
    "ppo_atari_equi": {"defaults": []},
    "rpo_mujoco": {"defaults": []},
    "sac_equi_bullet": {"defaults": [], "cpu": SAC_CPU},
    "cql_equi_offline": {"defaults": [], "cpu": SAC_CPU + ["--policy-lr", "3e-4", "--q-lr", "3e-4"]},
    "iql_equi_offline": {"defaults": [], "cpu": SAC_CPU + ["--policy-lr", "3e-4", "--q-lr", "3e-4"]},
}
CONDITIONS = ("nocache", "compiled")
MARKER_ENV = "STARTUP_TIME_MARKER"

# Imported by every Python process started with its folder on PYTHONPATH; it acts only when MARKER_ENV is set.
SITECUSTOMIZE = textwrap.dedent(f'''
    """startup_time.py: end the process at the first Optimizer.zero_grad, writing time.time() to ${MARKER_ENV}."""
    import os
    import sys

    _MARKER = os.environ.get("{MARKER_ENV}")


    class _PatchOptimizer:
        """A meta-path finder that waits for torch.optim.optimizer to be imported (torch is not imported early)."""

        def find_spec(self, name, path=None, target=None):
            if name != "torch.optim.optimizer":
                return None
            sys.meta_path.remove(self)
            for finder in sys.meta_path:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    break
            else:
                return None
            original_exec = spec.loader.exec_module

            def exec_module(module):
                original_exec(module)
                original_zero_grad = module.Optimizer.zero_grad

                def zero_grad(self, *args, **kwargs):
                    import time

                    stamp = time.time()
                    with open(_MARKER, "w") as f:
                        f.write(repr(stamp) + "\\n")
                    sys.stdout.flush()
                    os._exit(0)

                zero_grad.__wrapped__ = original_zero_grad
                module.Optimizer.zero_grad = zero_grad

            spec.loader.exec_module = exec_module
            return spec


    if _MARKER:
        sys.meta_path.insert(0, _PatchOptimizer())
''')


@dataclass
class Args(Output):
    before: Optional[str] = None
    """the old checkout (required), e.g. a `git worktree add /tmp/before <commit>`"""
    after: str = REPO
    """the new checkout (default: this repository)"""
    scripts: str = ",".join(SCRIPTS)
    """comma-separated training scripts (names without .py)"""
    configs: str = "defaults,cpu"
    """comma-separated configurations: defaults, cpu (the CPU presets; only sac/cql/iql have one)"""
    conditions: str = ",".join(CONDITIONS)
    """comma-separated bytecode conditions: nocache (every .py compiled at start), compiled (a warmed-up cache)"""
    repeats: int = 2
    """measured runs per checkout, script, configuration and condition"""
    sac_num_demos: Optional[int] = None
    """--num-demos of sac_equi_bullet.py in both checkouts (default: the script's default)"""
    timeout: float = 900.0
    """seconds a run may take to reach its first training step before it is stopped and counted as failed"""
    threads: int = 1
    """OMP_NUM_THREADS / MKL_NUM_THREADS of every run"""
    python: str = sys.executable
    """the Python interpreter that runs both checkouts' scripts"""
    workdir: Optional[str] = None
    """folder for the bytecode caches, dataset cache, working folders and logs (default: a new temporary folder)"""
    keep_workdir: bool = False
    """keep the work folder at the end (logs of every run are under <workdir>/logs)"""


@dataclass
class Measurement:
    first_step: Optional[float]  # seconds from launch to the first zero_grad, None when it was not reached
    first_line: Optional[float]  # seconds from launch to the first complete line of stdout
    first_line_text: str
    load1: float
    error: str = ""


def git_state(path: str) -> dict:
    """The commit of a checkout and whether its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"path": os.path.abspath(path), "commit": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%s"), "modified_tracked_files": len(changed.splitlines())}


def read_terminal(master: int, state: dict, start: float) -> None:
    """Drain the child's pseudo-terminal; note when its first complete line arrived and what it said."""
    buffer = b""
    while True:
        try:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if state.get("closed"):
                    return
                continue
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child's side is closed
            return
        if not chunk:
            return
        if "first_line" not in state:
            buffer += chunk
            if b"\n" in buffer:
                state["first_line"] = time.time() - start
                state["first_line_text"] = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()[:200]


def launch(command: list[str], env: dict, cwd: str, log: str, marker: str, timeout: float) -> Measurement:
    """Run `command` until it writes `marker` (or exits, or times out); time its first line and first step."""
    if os.path.exists(marker):
        os.remove(marker)
    master, slave = pty.openpty()
    state: dict = {}
    load1 = os.getloadavg()[0]
    with open(log, "w") as err:
        start = time.time()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=err,
                                start_new_session=True)
        os.close(slave)
        reader = threading.Thread(target=read_terminal, args=(master, state, start), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
            error = ""
        except subprocess.TimeoutExpired:
            error = f"no training step within {timeout:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the script and anything it started (env workers)
            except ProcessLookupError:
                pass
            proc.wait()
            state["closed"] = True
            reader.join(timeout=5)
            os.close(master)
    first_step = None
    if os.path.exists(marker):
        with open(marker) as f:
            first_step = float(f.read()) - start
    elif not error:
        error = f"exit {proc.returncode} before the first training step"
    if error:
        tail = log_tail(log, 8).strip()
        error += f"; stderr ends: {tail[-600:]}" if tail else ""
    return Measurement(first_step, state.get("first_line"), state.get("first_line_text", ""), round(load1, 2), error)


def summary_rows(runs: list[dict], labels: list[str]) -> list[dict]:
    """Median, min and max per (checkout, script, config, condition), in the order the keys first appear."""
    keys = []
    for r in runs:
        key = (r["checkout"], r["script"], r["config"], r["condition"])
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (SCRIPTS.index(k[1]) if k[1] in SCRIPTS else 99, k[2], k[3], labels.index(k[0])))
    rows = []
    for key in keys:
        group = [r for r in runs if (r["checkout"], r["script"], r["config"], r["condition"]) == key]
        row = dict(zip(("checkout", "script", "config", "condition"), key))
        row["runs"], row["failed"] = len(group), sum(r["first_step_s"] is None for r in group)
        for name in ("first_step_s", "first_line_s"):
            values = [r[name] for r in group if r[name] is not None]
            row[f"{name[:-2]}_median_s"] = round(statistics.median(values), 2) if values else None
            row[f"{name[:-2]}_min_s"] = round(min(values), 2) if values else None
            row[f"{name[:-2]}_max_s"] = round(max(values), 2) if values else None
        row["load1_median"] = round(statistics.median(r["load1"] for r in group), 2)
        rows.append(row)
    return rows


def markdown(rows: list[dict], labels: list[str]) -> str:
    """Side-by-side table: seconds to first step and first line, median (min-max), per checkout."""
    def cell(row, name):
        if row is None or row[f"{name}_median_s"] is None:
            return "-"
        return f"{row[f'{name}_median_s']:.1f} ({row[f'{name}_min_s']:.1f}-{row[f'{name}_max_s']:.1f})"

    index = {(r["checkout"], r["script"], r["config"], r["condition"]): r for r in rows}
    lines = ["| script | config | bytecode | " + " | ".join(f"first step, {x}" for x in labels) + " | after/before | "
             + " | ".join(f"first line, {x}" for x in labels) + " | load (1 min) |",
             "|---|---|---|" + "---:|" * (2 * len(labels) + 2)]
    seen = []
    for r in rows:
        key = (r["script"], r["config"], r["condition"])
        if key in seen:
            continue
        seen.append(key)
        pair = [index.get((label, *key)) for label in labels]
        medians = [p["first_step_median_s"] if p else None for p in pair]
        ratio = f"{medians[1] / medians[0]:.2f}" if len(medians) == 2 and None not in medians else "-"
        loads = "/".join(f"{p['load1_median']:.1f}" for p in pair if p)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cell(p, "first_step") for p in pair)
                     + f" | {ratio} | " + " | ".join(cell(p, "first_line") for p in pair) + f" | {loads} |")
    return "\n".join(lines)


def main() -> None:
    args = cli(Args, __doc__)
    if args.before is None:
        fail("pass --before <the old checkout>, e.g. after `git worktree add /tmp/before b5f5ce1`.")
    checkouts = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    scripts = args.scripts.split(",")
    configs = args.configs.split(",")
    conditions = args.conditions.split(",")
    for name in scripts:
        if name not in PRESETS:
            fail(f"--scripts: unknown script {name!r}; choose from {', '.join(SCRIPTS)}.")
    for label, path in checkouts.items():
        missing = [s for s in scripts if not os.path.isfile(os.path.join(path, f"{s}.py"))]
        if missing:
            fail(f"--{label} {path} has no {missing[0]}.py; pass the root of a checkout of this repository.")
    if set(configs) - {"defaults", "cpu"} or not configs:
        fail(f"--configs takes defaults and/or cpu, not {args.configs!r}.")
    if set(conditions) - set(CONDITIONS) or not conditions:
        fail(f"--conditions takes nocache and/or compiled, not {args.conditions!r}.")
    if args.repeats < 1:
        fail(f"--repeats must be at least 1, not {args.repeats}.")
    out = results_path(args, "startup_time.json", (".csv",))
    cases = [(s, c, PRESETS[s][c]) for s in scripts for c in configs if c in PRESETS[s]]
    if not cases:
        fail("no script has the configurations asked for (only sac/cql/iql have `cpu`).")
    if args.sac_num_demos is not None:
        cases = [(s, c, flags + (["--num-demos", str(args.sac_num_demos)] if s == "sac_equi_bullet" else []))
                 for s, c, flags in cases]

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="startup_time_"))
    for sub in ("site", "logs", "data", "pycache_compiled", "cwd"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    with open(os.path.join(workdir, "site", "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    marker = os.path.join(workdir, "marker")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CUDA_LAUNCH"))}
    base_env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                    CLEANRL_EQUI_DATA=os.path.join(workdir, "data"), **{MARKER_ENV: marker})
    started, load_start = time.time(), load_average()
    states_start = {label: git_state(path) for label, path in checkouts.items()}  # a checkout may change meanwhile
    print(f"work folder {workdir}; load average {load_start}", flush=True)

    def run(label: str, script: str, config: str, flags: list[str], condition: str, tag: str) -> Measurement:
        root = checkouts[label]
        env = dict(base_env, PYTHONPATH=os.pathsep.join([root, os.path.join(workdir, "site")]))
        if condition == "compiled":
            env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache_compiled")
        else:
            env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="pycache_empty_", dir=workdir)
        if tag != "warmup":
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        cwd = tempfile.mkdtemp(prefix=f"{script}_", dir=os.path.join(workdir, "cwd"))
        log = os.path.join(workdir, "logs", f"{label}_{script}_{config}_{condition}_{tag}.stderr")
        command = [args.python, os.path.join(root, f"{script}.py"), *flags]
        try:
            return launch(command, env, cwd, log, marker, args.timeout)
        finally:
            shutil.rmtree(cwd, ignore_errors=True)
            if condition == "nocache":
                shutil.rmtree(env["PYTHONPYCACHEPREFIX"], ignore_errors=True)

    # Warm-up: fills the compiled bytecode cache (writing allowed) and the default datasets; not measured.
    warmups = []
    for script, config, flags in cases:
        for label in checkouts:
            m = run(label, script, config, flags, "compiled", "warmup")
            warmups.append({"checkout": label, "script": script, "config": config, "first_step_s": m.first_step,
                            "error": m.error})
            status = f"{m.first_step:.1f} s" if m.first_step is not None else f"FAILED: {m.error}"
            print(f"warm-up {label:6s} {script} {config}: {status}", flush=True)

    runs = []
    total = args.repeats * len(cases) * len(conditions) * len(checkouts)
    for repeat in range(args.repeats):
        order = list(checkouts) if repeat % 2 == 0 else list(checkouts)[::-1]
        for script, config, flags in cases:
            for condition in conditions:
                for label in order:
                    m = run(label, script, config, flags, condition, f"r{repeat}")
                    runs.append({"repeat": repeat, "checkout": label, "script": script, "config": config,
                                 "condition": condition, "flags": flags,
                                 "first_step_s": None if m.first_step is None else round(m.first_step, 3),
                                 "first_line_s": None if m.first_line is None else round(m.first_line, 3),
                                 "first_line": m.first_line_text, "load1": m.load1, "error": m.error})
                    step = f"{m.first_step:6.1f} s" if m.first_step is not None else "FAILED"
                    line = f"{m.first_line:6.1f} s" if m.first_line is not None else "     -"
                    print(f"[{len(runs)}/{total}] {label:6s} {script:16s} {config:8s} {condition:8s} first step {step}"
                          f" | first line {line} | load {m.load1:.1f}" + (f" | {m.error}" if m.error else ""),
                          flush=True)

    labels = list(checkouts)
    rows = summary_rows(runs, labels)
    result = {
        "what": "seconds from launching a training script to its first training step (first Optimizer.zero_grad, "
                "i.e. the first loss computed) and to its first line of stdout; median, min and max over repeats",
        "method": "python <checkout>/<script>.py <flags> in an empty folder, stdout on a pseudo-terminal, "
                  f"OMP_NUM_THREADS={args.threads}, checkout root first on PYTHONPATH, a sitecustomize.py that ends "
                  "the process at the first zero_grad; nocache = PYTHONPYCACHEPREFIX empty + "
                  "PYTHONDONTWRITEBYTECODE=1, compiled = PYTHONPYCACHEPREFIX filled by one warm-up run; checkouts "
                  "alternate ABBA over repeats; the warm-up runs (not measured) also pre-build the cql/iql default "
                  "datasets under a shared $CLEANRL_EQUI_DATA and fill the caches both checkouts share (escnn's "
                  "joblib cache in site-packages)",
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_seconds": round(time.time() - started),
        "checkouts_at_start": states_start,
        "checkouts": {label: git_state(path) for label, path in checkouts.items()},
        "settings": {"scripts": scripts, "configs": configs, "conditions": conditions, "repeats": args.repeats,
                     "flags": {f"{s} {c}": flags for s, c, flags in cases}, "sac_num_demos": args.sac_num_demos,
                     "threads": args.threads, "python": args.python},
        "summary": rows,
        "warmups": warmups,
        "runs": runs,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(companion(out, ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows, labels))
    for label in labels:
        if result["checkouts"][label] != states_start[label]:
            print(f"note: the {label} checkout changed during the run (commit or modified files); see "
                  "checkouts_at_start in the results")
    print(f"load average {load_start} at the start, {result['load_average_end']} at the end; "
          f"{result['wall_seconds'] / 60:.1f} min")
    print(f"wrote {out} and its .csv")
    if not args.keep_workdir and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [r for r in runs if r["error"]]
    if failed:
        print(f"error: {len(failed)} of {len(runs)} run(s) did not reach a training step; see `error` in {out}.",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
