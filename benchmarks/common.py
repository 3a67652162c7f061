"""What every benchmark in benchmarks/ shares: its command line, where its results go, what machine they came from,
and how it runs a list of training runs in parallel.

Command line. Each benchmark's flags are a tyro dataclass (like the training scripts), one docstring per field, read
with `cli`. The flags several benchmarks have are the dataclasses here, which a benchmark's `Args` inherits:

    Output    --out, --tag, --overwrite: where the results go (see `results_path`)
    Launch    --device, --parallel, --threads: how the training runs are started (see `run_jobs`)

A benchmark that starts training runs passes the flags after `--` on to every run (`cli(..., passthrough=True)`).

Results are committed. `results_path` therefore never replaces an existing results file or folder unless told to:
the default path (benchmarks/results/<name><tag>.<ext>) or the one --out names may exist only with --overwrite.
Otherwise the benchmark stops at once, before it measures anything, with one sentence (exit 2).

Runs. `run_jobs` starts a list of `Job`s (a command, its working folder, extra environment variables, a log file),
at most `parallel` at a time, prints a progress line when a job starts and ends, and at the end names every job that
failed with its exit status, command and the tail of its log (exit 1).

`machine_info` is the hardware, load and software record that goes into every results JSON.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, NoReturn, Optional, Sequence, TypeVar

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2 (a usage mistake, not a failed measurement)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---- Command line ---------------------------------------------------------------------------------------------------
@dataclass
class Output:
    """Where the results go."""

    out: Optional[str] = None
    """results path (default: the benchmark's name in benchmarks/results/ with --tag)"""
    tag: str = ""
    """suffix of the default results name, e.g. '_gpu' (not used with --out)"""
    overwrite: bool = False
    """replace existing results (without it, the benchmark stops before it measures anything)"""


@dataclass
class Launch:
    """How the training runs are started."""

    device: Literal["cuda", "cpu"] = "cuda"
    """cuda: the scripts' default (the GPU when there is one); cpu: every run gets --no-cuda"""
    parallel: int = 1
    """training runs at the same time"""
    threads: int = 1
    """OMP/MKL threads of each run"""


def cli(args_type: type[T], description: Optional[str] = None, passthrough: bool = False,
        argv: Optional[Sequence[str]] = None) -> T | tuple[T, list[str]]:
    """Parse the command line into `args_type` (a dataclass inheriting `Output` / `Launch` as it needs).

    With `passthrough`, everything after the first `--` is returned as well, as the extra flags for every training
    run: `(args, extra)`. The common flags are checked here (a bad value stops with one sentence).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if passthrough and "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    if passthrough:
        note = "Flags after `--` go to every training run."
        description = f"{description.rstrip()}\n\n{note}" if description else note
    args = tyro.cli(args_type, args=argv, description=description)
    if isinstance(args, Launch):
        if args.parallel < 1:
            fail(f"--parallel must be at least 1, not {args.parallel}.")
        if args.threads < 1:
            fail(f"--threads must be at least 1, not {args.threads}.")
    return (args, extra) if passthrough else args


def device_flags(device: str) -> list[str]:
    """The training scripts' flags for `--device`: they use the GPU when there is one unless told --no-cuda."""
    return ["--no-cuda"] if device == "cpu" else []


def load_script(name: str):
    """A training script of the repository root (e.g. "sac_equi_bullet") as a module: its networks, losses and helpers
    (it trains only under __main__)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that give a process `threads` BLAS/OpenMP threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ---- Results --------------------------------------------------------------------------------------------------------
def results_path(args: Output, default_name: str, companions: Sequence[str] = (), folder: bool = False) -> str:
    """The path to write the results to: `--out`, else benchmarks/results/`default_name` with `--tag` inserted
    before its extension (`default_name` is e.g. "sac_learning.json"; a folder name has no extension).

    `companions` are the extensions of the files written next to it under the same name (e.g. (".csv", ".png")).
    An existing result (the file, a companion, or a non-empty folder), at the default path or at --out, is refused
    unless --overwrite is given: the benchmark stops with one sentence, before it runs. Creates the parent folder.
    """
    if args.out:
        path = os.path.abspath(args.out)
        stem = path if folder else os.path.splitext(path)[0]
    else:
        stem, ext = (default_name, "") if folder else os.path.splitext(default_name)
        path = os.path.join(RESULTS, f"{stem}{args.tag}{ext}")
        stem = path if folder else os.path.splitext(path)[0]
    existing = [p for p in [path, *(stem + c for c in companions)]
                if os.path.isfile(p) or (os.path.isdir(p) and os.listdir(p))]
    if existing and not args.overwrite:
        where = "committed results" if not args.out else "from an earlier run"
        fail(f"{os.path.relpath(existing[0])} exists ({where}); pass --overwrite to replace it, "
             "or --out <path> to write somewhere else.")
    os.makedirs(path if folder else (os.path.dirname(path) or "."), exist_ok=True)
    return path


def companion(path: str, extension: str) -> str:
    """The file next to results `path` with the same name and `extension` (e.g. the .csv of a .json)."""
    return os.path.splitext(path)[0] + extension


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the machine type where there is none)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    """The commit the benchmark ran from, "+changes" where the work tree differed from it ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def machine_info(device: Optional[str] = None) -> dict:
    """Date, CPU model, logical cores, load average, Python, torch and GPU: the record for a results JSON.

    `device` (a torch device string) names the GPU used when it is a CUDA device; torch is imported here.
    """
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device is not None and device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        info["torch"] = None
    return info


# ---- Running jobs ---------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One process to run: `command` in folder `cwd`, with `env` added to this process's environment, its stdout and
    stderr going to the file `log`."""

    name: str
    command: list[str]
    log: str
    cwd: str = REPO
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    job: Job
    returncode: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def log_tail(path: str, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _interrupt(signum, frame) -> NoReturn:
    raise KeyboardInterrupt


def run_jobs(jobs: Sequence[Job], parallel: int = 1, check: bool = True, poll_seconds: float = 1.0,
             heartbeat_minutes: float = 10.0, tail_lines: int = 20, quiet: bool = False,
             hint: str = "") -> list[JobResult]:
    """Run `jobs`, at most `parallel` at a time, in the order given; return their results in that order.

    Prints a progress line when a job starts and when one ends (and every `heartbeat_minutes` while they run). Every
    job runs even when another fails; at the end each failed job is reported with its exit status, command, log path
    and the last `tail_lines` lines of its log, and with `check` the process exits with status 1 (after printing
    `hint`, e.g. how to use the jobs that did finish). Ctrl-C (or TERM)
    stops the running jobs (TERM, then KILL after 30 s) and exits with status 130.
    """
    if parallel < 1:
        fail(f"--parallel must be at least 1, not {parallel}.")
    waiting = deque(enumerate(jobs))
    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    results: dict[int, JobResult] = {}
    total, failed = len(jobs), 0
    say = (lambda _: None) if quiet else (lambda line: print(line, flush=True))

    def status() -> str:
        return f"{len(results)}/{total} done, {len(running)} running, {len(waiting)} waiting, {failed} failed"

    previous_term = signal.getsignal(signal.SIGTERM)
    if previous_term in (signal.SIG_DFL, None) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # TERM stops the jobs as Ctrl-C does (e.g. scancel, timeout)
    else:
        previous_term = None
    last_beat = time.time()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                index, job = waiting.popleft()
                os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
                os.makedirs(job.cwd, exist_ok=True)
                log = open(job.log, "w")
                log.write(f"$ cd {shlex.quote(job.cwd)} && {shlex.join(job.command)}\n")
                log.flush()
                proc = subprocess.Popen(job.command, cwd=job.cwd, env={**os.environ, **job.env}, stdout=log,
                                        stderr=subprocess.STDOUT)
                running[index] = (proc, time.time(), log)
                say(f"[{status()}] started {job.name}  (log: {job.log})")
            time.sleep(poll_seconds)
            for index in [i for i, (proc, _, _) in running.items() if proc.poll() is not None]:
                proc, start, log = running.pop(index)
                log.close()
                result = JobResult(jobs[index], proc.returncode, time.time() - start)
                results[index] = result
                failed += not result.ok
                outcome = "finished" if result.ok else f"FAILED (exit {proc.returncode})"
                say(f"[{status()}] {outcome}: {result.job.name} after {_duration(result.seconds)}")
            if running and time.time() - last_beat > 60 * heartbeat_minutes:
                last_beat = time.time()
                names = ", ".join(f"{jobs[i].name} ({_duration(time.time() - s)})" for i, (_, s, _) in running.items())
                say(f"[{status()}] running: {names}")
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            proc.terminate()
        deadline = time.time() + 30
        for proc, _, log in running.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        print(f"interrupted: stopped {len(running)} running job(s), {len(waiting)} not started", flush=True)
        raise SystemExit(130) from None
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)

    ordered = [results[i] for i in range(total)]
    bad = [r for r in ordered if not r.ok]
    for r in bad:
        print(f"\nFAILED: {r.job.name} (exit {r.returncode} after {_duration(r.seconds)})\n"
              f"  command: cd {shlex.quote(r.job.cwd)} && {shlex.join(r.job.command)}\n"
              f"  log: {r.job.log}; its last lines:", file=sys.stderr)
        tail = log_tail(r.job.log, tail_lines).rstrip("\n")
        print("\n".join("    " + line for line in tail.splitlines()) or "    (empty)", file=sys.stderr, flush=True)
    if bad and check:
        print(f"error: {len(bad)} of {total} job(s) failed: {', '.join(r.job.name for r in bad)}."
              + (f" {hint[0].upper()}{hint[1:]}." if hint else ""), file=sys.stderr, flush=True)
        raise SystemExit(1)
    return ordered

