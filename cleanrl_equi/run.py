"""Run plumbing of the training scripts: one-sentence errors, checkpoint files, and `Run`, which owns everything a run
needs besides its algorithm (run name and directory, TensorBoard writer, wandb, resume file, stop signals, periodic
checkpoints, RNG state, progress line).

A mistake a user can make (a bad flag, a missing file) should stop the script with one sentence that names the
fix, not a stack trace from deep inside training: `fail` prints that sentence and exits with status 2.

Runs survive SLURM time limits and preemption. A training script keeps one resume file in its run directory,
written every `--checkpoint-minutes` and when a signal says the job is about to stop: SLURM sends
`--signal=B:USR1@<seconds>` before the wall-time limit and TERM on preemption or scancel. The script then asks
SLURM to requeue the job and exits; the requeued job runs the same command, finds the same run directory (its name
comes from the SLURM job id, or from --run-name) and continues from the same global step with the same networks,
optimisers and RNG state (and replay buffer, where there is one). TensorBoard drops whatever the interrupted run
logged after its resume file (`purge_step`), so curves continue without gaps or repeated steps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, NoReturn

import numpy as np
import torch

RESUME_FILE = "resume.pt"
OWNER_FILE = "run.json"  # which script made a run directory, so another script never writes into it
RESUMABLE_CHANGES = ("total_timesteps", "num_iterations", "checkpoint_minutes", "progress_interval", "cuda", "track",
                     "wandb_project_name", "wandb_entity", "save_model", "capture_video", "run_name")
"""Flags that may differ between an interrupted run and its resumption (num_iterations: the PPO scripts derive it
from total_timesteps); any other difference is refused."""


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2 (the usual exit status for bad usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def require(args: Any, positive: tuple[str, ...] = (), fractions: tuple[str, ...] = (),
            non_negative: tuple[str, ...] = (), at_least_one: tuple[str, ...] = ()) -> None:
    """Stop with one sentence naming the flag when a setting is out of its range: `positive` (> 0: learning rates,
    temperatures), `fractions` (in [0, 1]: discounts, Polyak coefficients), `non_negative`, `at_least_one` (counts).
    The seed is always checked: NumPy takes seeds in [0, 2^32)."""
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be a whole number from 0 to 2^32 - 1, not {args.seed}.")
    for names, ok, rule in ((positive, lambda v: v > 0, "must be positive"),
                            (fractions, lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
                            (non_negative, lambda v: v >= 0, "must not be negative"),
                            (at_least_one, lambda v: v >= 1, "must be at least 1")):
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                fail(f"--{name.replace('_', '-')} {rule}, not {value}.")


def device_for(args: Any) -> torch.device:
    """CUDA when asked for (`--cuda`, the default) and available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def write_error(path: str, exc: OSError) -> NoReturn:
    """One sentence for a file that cannot be written: a full disk, a read-only or missing folder, no permission."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    fix = {errno.ENOSPC: "free some space (or point the run elsewhere) and run the same command again",
           errno.EDQUOT: "free some of your quota and run the same command again",
           errno.EROFS: "run from a writable folder (runs/ is created in the working directory)",
           errno.EACCES: "run from a folder you may write to (runs/ is created in the working directory)"}
    fail(f"cannot write {path!r} ({reason}); {fix.get(exc.errno, 'check the folder and run the same command again')}.")


def save_checkpoint(path: str, script: str, args: Any, **state: Any) -> None:
    """Write `state` (state_dicts, tensors, plain data) with the script name and its args to `path`, atomically.

    The file is written next to its final place and renamed, so an interrupted save (a SLURM time limit) never
    leaves a truncated checkpoint behind; a failed write (full disk, read-only folder) removes its partial file and
    stops with one sentence, leaving any earlier file at `path` as it was.
    """
    payload = {"script": script, "args": dict(vars(args)), **state}
    tmp_path = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp_path, "wb") as f:  # a Python file, so a full disk surfaces as OSError(ENOSPC), not torch's own
            torch.save(payload, f, pickle_protocol=4)  # protocol 2 (torch's default) inflates NumPy bytes by ~1.5x
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer adds its own RuntimeError on top of the OSError
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        cause = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        write_error(path, cause)


def refuse_folder(path: str, what: str, suffix: str) -> None:
    """One sentence when a folder is given where a file is expected, naming a file inside it if there is one."""
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith(suffix))
        hint = f" such as {os.path.join(path, found[0])!r}" if found else ""
        fail(f"{what} {path!r} is a folder; pass the {suffix} file{hint}.")


def load_checkpoint(path: str, script: str, map_location: str | torch.device = "cpu",
                    fix: str = "evaluate it with that script") -> dict:
    """Read a checkpoint written by `save_checkpoint` for `script`, failing with one sentence if it cannot be used."""
    refuse_folder(path, "checkpoint", ".cleanrl_model")
    if not os.path.isfile(path):
        fail(f"checkpoint {path!r} does not exist; pass the path of a file written with --save-model.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # any unpickling problem means the file is not a usable checkpoint
        fail(f"checkpoint {path!r} could not be read ({type(exc).__name__}); it is corrupt or not a checkpoint.")
    if not isinstance(payload, dict) or "script" not in payload:
        fail(f"checkpoint {path!r} was not written by a cleanrl-equi script.")
    if payload["script"] != script:
        fail(f"checkpoint {path!r} was written by {payload['script']}, not {script}; {fix}.")
    return payload


def load_state(module: Any, state: dict, path: str) -> None:
    """`module.load_state_dict(state)`, failing with one sentence when the shapes or names do not match."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"checkpoint {path!r} does not fit this network ({first[:160]}); it has other shapes or settings.")


def make_run_name(run_name: str | None, env_label: str, exp_name: str, seed: int) -> str:
    """`--run-name` if given; under SLURM `{env}__{exp}__{seed}__slurm{job}` (array task: `{array_job}_{task}`),
    which a requeued job finds again; otherwise CleanRL's `{env}__{exp}__{seed}__{unix time}`."""
    if run_name:
        return run_name
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{env_label}__{exp_name}__{seed}__slurm{array_job}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"{env_label}__{exp_name}__{seed}__slurm{os.environ['SLURM_JOB_ID']}"
    return f"{env_label}__{exp_name}__{seed}__{int(time.time())}"


class StopSignal:
    """Remembers that SLURM (or anyone) asked the job to stop: USR1 (the wall-time warning), TERM (preemption,
    scancel) or INT (Ctrl-C). The training loop checks `requested` at a step boundary, where a checkpoint is
    consistent. A second Ctrl-C stops at once, without a resume file (any earlier one stays)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:
                print("\nsecond Ctrl-C: stopping now, without a new resume file", file=sys.stderr, flush=True)
                raise SystemExit(128 + signum)
            print("\nCtrl-C: stopping after this step with a resume file (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


class CheckpointClock:
    """True every `minutes` of wall time (0 = never): the periodic checkpoint that a hard kill cannot take away."""

    def __init__(self, minutes: float):
        self.seconds, self.last = 60.0 * minutes, time.time()

    def due(self) -> bool:
        if self.seconds <= 0 or time.time() - self.last < self.seconds:
            return False
        self.last = time.time()
        return True


def rng_state() -> dict[str, Any]:
    """Every global random generator a script draws from (Python, NumPy, torch CPU and CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(run_dir: str, script: str, args: Any, **state: Any) -> None:
    """Write the run's resume file (atomically, with the RNG state); `state` is whatever the loop needs to go on."""
    save_checkpoint(os.path.join(run_dir, RESUME_FILE), script, args, rng=rng_state(), **state)


def load_resume(run_dir: str, script: str, args: Any) -> dict | None:
    """The run's resume file if there is one (None for a new run), after checking it was written by `script` with
    the same settings. Fails with one sentence if the file cannot be used."""
    path = os.path.join(run_dir, RESUME_FILE)
    if not os.path.exists(path):
        return None
    payload = load_checkpoint(path, script, fix="this run directory belongs to that script; pick another --run-name")
    saved, now = payload["args"], dict(vars(args))
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} there, {now.get(k)!r} now)" for k in changed)
        fail(f"{path!r} was saved with other settings: {flags}; resume with the same flags or pick a new --run-name.")
    return payload


def drop_compiled_code() -> None:
    """Forget what `--compile` compiled. Its caches hold the script's globals (the vector env among them) until the
    interpreter's very end, after ale-py's bindings are torn down, which then print a page of "leaked instance"
    warnings. An eager run never imported torch._dynamo (importing it takes a second): nothing to do."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def stop_for_requeue(stop: StopSignal, run_name: str = "") -> NoReturn:
    """After the resume file is written: on SLURM's time-limit warning (USR1) requeue this job, which restarts and
    resumes; then exit. TERM is not requeued here: `scancel` sends it too (and SLURM's state cannot tell the two
    apart at that moment), and a site that preempts with requeue requeues the job itself. Otherwise the exit status
    is the usual 128 + signal number, so a caller sees the run did not finish (the same command resumes it)."""
    drop_compiled_code()
    job_id = os.environ.get("SLURM_JOB_ID")
    name = signal.Signals(stop.received).name if stop.received else "stop"
    if job_id and shutil.which("scontrol") and stop.received == signal.SIGUSR1:
        print(f"{name} received: checkpoint written; requeueing SLURM job {job_id}", flush=True)
        subprocess.run(["scontrol", "requeue", job_id], check=False)
        raise SystemExit(0)
    how = f" with --run-name {run_name}" if run_name else ""
    print(f"{name} received: checkpoint written; run the same command{how} to resume", flush=True)
    raise SystemExit(128 + (stop.received or 0))


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


class Run:
    """The plumbing of one training run, so the script keeps to its algorithm. In a script:

        run = Run(SCRIPT, args, env_label)         # run dir, device, writer, wandb; reads a resume file if present
        run.keep(actor=actor, optimizer=opt, ...)  # the resumable state, listed once (state_dict/load_state_dict,
                                                   # or tensors)
        step = run.resume(global_step=0, ...)      # the loop's counters: saved values on resume, else these;
                                                   # restores the kept state and the RNG
        for ...:
            run.checkpoint(global_step=..., ...)   # at a step boundary: periodic resume file; on USR1/TERM also
                                                   # stop (and requeue under SLURM)
            run.progress(global_step, total, ...)  # a progress line every --progress-interval seconds
        run.save_model(actor=actor.state_dict())   # --save-model's file
        run.finish(global_step=..., ...)           # the final resume file (a longer run extends from it); logs closed

    It prints the run directory and device as soon as it is made, refuses a directory that holds another script's
    run or a run it cannot continue, and stops cleanly on USR1, TERM and Ctrl-C (with a resume file) and on a full
    disk or read-only folder (one sentence). On resume, TensorBoard purges what the interrupted run logged after its
    resume file, and wandb continues the run of the same name.
    """

    def __init__(self, script: str, args: Any, env_label: str):
        self.script, self.args = script, args
        self.name = make_run_name(args.run_name, env_label, args.exp_name, args.seed)
        self.dir = os.path.join("runs", self.name)
        self.resume_path = os.path.join(self.dir, RESUME_FILE)
        self.device = device_for(args)
        self._check_owner()
        self.saved = load_resume(self.dir, script, args)
        if self.saved is not None and not {"counters", "state"} <= set(self.saved):
            fail(f"{self.resume_path!r} was written by an older version of {script}; pick another --run-name.")
        self._claim_directory()
        self.state: dict[str, Any] = {}
        if args.track:
            try:
                import wandb
            except ImportError:
                fail("--track logs to Weights & Biases, which is not installed; install it with `uv pip install "
                     "wandb`, or leave out --track.")
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.name, save_code=True, resume="allow", id=self.name)
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(self.dir, purge_step=self.saved["global_step"] + 1 if self.saved else None)
        except OSError as exc:
            write_error(self.dir, exc)
        if self.saved is None:
            rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
        self.stop, self.clock = StopSignal(), CheckpointClock(args.checkpoint_minutes)
        self.start_time, self.start_step, self.last_progress = time.time(), 0, 0.0
        what = f"resuming {self.dir} from global step {self.saved['global_step']}" if self.saved else f"run {self.dir}"
        print(f"{what} on {self.device}", flush=True)

    def _check_owner(self) -> None:
        """A run directory belongs to the script that made it (run.json): another script never writes into it."""
        owner_path = os.path.join(self.dir, OWNER_FILE)
        if os.path.isfile(owner_path):
            try:
                with open(owner_path) as f:
                    owner = json.load(f).get("script")
            except (OSError, ValueError, AttributeError):
                fail(f"{owner_path!r} cannot be read; pick another --run-name (nothing in {self.dir!r} was changed).")
            if owner != self.script:
                fail(f"{self.dir!r} holds a run of {owner}, not {self.script}; pick another --run-name.")

    def _claim_directory(self) -> None:
        """A new run never writes into a directory that holds a run without a resume file to continue from."""
        owner_path = os.path.join(self.dir, OWNER_FILE)
        if self.saved is None and os.path.isdir(self.dir) and any(
                name.startswith("events.out.tfevents.") for name in os.listdir(self.dir)):
            fail(f"{self.dir!r} already holds a run without a resume file to continue from; pick another --run-name "
                 "(nothing in it was changed).")
        try:
            os.makedirs(self.dir, exist_ok=True)
            if not os.path.isfile(owner_path):
                with open(owner_path, "w") as f:
                    json.dump({"script": self.script, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "args": dict(vars(self.args))}, f, indent=1, default=str)
        except OSError as exc:
            write_error(self.dir, exc)

    def keep(self, **state: Any) -> None:
        """Name the state a resumed run needs: objects with state_dict/load_state_dict, or tensors."""
        self.state = state

    def resume(self, **counters: Any) -> dict[str, Any]:
        """The loop's counters (`global_step` among them): the saved ones when resuming (after loading the kept state
        and restoring the RNG, so it is the last thing before the loop), else the given starting values."""
        if self.saved is not None:
            for key, target in self.state.items():
                if isinstance(target, torch.Tensor):
                    with torch.no_grad():
                        target.copy_(self.saved["state"][key])
                else:
                    load_state(target, self.saved["state"][key], self.resume_path)
            counters = {key: self.saved["counters"][key] for key in counters}
            set_rng_state(self.saved["rng"])
        self.start_time, self.start_step = time.time(), counters["global_step"]  # SPS counts this process's steps
        return counters

    def checkpoint(self, **counters: Any) -> None:
        """At a step boundary: write the resume file when the clock says so or a stop signal came; after a signal,
        stop (under SLURM's USR1: requeue)."""
        if not (self.stop.requested or self.clock.due()):
            return
        self._save_resume(counters)
        if self.stop.requested:
            self.writer.close()
            stop_for_requeue(self.stop, self.name)

    def _save_resume(self, counters: dict[str, Any]) -> None:
        self.writer.flush()  # what was logged up to this step is on disk before the resume file says so
        state = {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value.state_dict()
                 for key, value in self.state.items()}
        save_resume(self.dir, self.script, self.args, global_step=counters["global_step"], counters=counters,
                    state=state)

    def sps(self, global_step: int) -> float:
        """Steps per second of this process (a resumed run counts from its restart)."""
        return (global_step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def progress(self, global_step: int, total: int, *fields: str, force: bool = False) -> None:
        """`step N/total | SPS | fields... | time left`, at most every `--progress-interval` seconds (or `force`)."""
        if not force and time.time() - self.last_progress < self.args.progress_interval:
            return
        self.last_progress = time.time()
        sps = self.sps(global_step)
        left = format_minutes((total - global_step) / sps) if sps > 0 else "?"
        line = " | ".join([f"step {global_step}/{total}", f"SPS {sps:.1f}", *fields, f"{left} left"])
        print(line, flush=True)

    def save_model(self, **state: Any) -> str:
        """`--save-model`: write runs/{run}/{exp_name}.cleanrl_model (with the script name and args); its path."""
        path = os.path.join(self.dir, f"{self.args.exp_name}.cleanrl_model")
        save_checkpoint(path, self.script, self.args, **state)
        print(f"model saved to {path}", flush=True)
        return path

    def finish(self, **counters: Any) -> None:
        """The end of training: the resume file now says where the run ended (so raising --total-timesteps extends
        it from there, never from an older file), and the logs are closed."""
        self._save_resume(counters)
        self.writer.close()
        drop_compiled_code()
