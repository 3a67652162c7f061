"""The lifecycle of a training run: `Run` owns everything a run needs besides its algorithm (run name and
directory, TensorBoard writer, wandb, resume file, stop signals, periodic checkpoints, RNG state, progress line).

Runs survive SLURM time limits and preemption. A training script keeps one resume file in its run directory,
written every `--checkpoint-minutes` and when a signal says the job is about to stop: SLURM sends
`--signal=B:USR1@<seconds>` before the wall-time limit and TERM on preemption or scancel. The script then asks
SLURM to requeue the job and exits; the requeued job runs the same command, finds the same run directory (its name
comes from the SLURM job id, or from --run-name) and continues from the same global step with the same networks,
optimisers and RNG state (and replay buffer, where there is one). TensorBoard drops whatever the interrupted run
logged after its resume file (`purge_step`), so curves continue without gaps or repeated steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, NoReturn

import torch

from cleanrl_equi.checkpoints import RESUME_FILE, load_resume, load_state, save_checkpoint, save_resume, set_rng_state
from cleanrl_equi.errors import fail, write_error

OWNER_FILE = "run.json"  # which script made a run directory, so another script never writes into it


def device_for(args: Any) -> torch.device:
    """CUDA when asked for (`--cuda`, the default) and available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def make_run_name(run_name: str | None, default_name: str) -> str:
    """`--run-name` if given (a plain folder name: it may not leave runs/); under SLURM the script's CleanRL name
    `{env}__{exp}__{seed}__{unix time}` with `slurm{job}` (array task: `slurm{array_job}_{task}`) in place of the
    time, which a requeued job finds again; otherwise `default_name` itself."""
    if run_name:
        if run_name in (".", "..") or os.sep in run_name or "/" in run_name or not run_name.strip():
            fail(f"--run-name {run_name!r} must be a plain folder name inside runs/ (no '/', not '..').")
        return run_name
    prefix = default_name.rsplit("__", 1)[0]
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{prefix}__slurm{array_job}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"{prefix}__slurm{os.environ['SLURM_JOB_ID']}"
    return default_name


def new_folder(base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first that does not exist yet, so a second evaluation (or a resumed
    run) never writes its videos into an earlier folder (gymnasium's RecordVideo numbers its files from 0 again)."""
    folder, n = base, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    return folder


def keep_earlier_videos(run_name: str, global_step: int) -> None:
    """On resume, the videos the interrupted part recorded (`videos/{run_name}`, `videos/{run_name}-eval`, the
    folders the scripts name) move aside to `...-before-step-{global_step}`: the resumed part records into the same
    names from episode 0 again, which would replace them."""
    for folder in (f"videos/{run_name}", f"videos/{run_name}-eval"):
        if os.path.isdir(folder) and os.listdir(folder):
            kept = new_folder(f"{folder}-before-step-{global_step}")
            os.replace(folder, kept)
            print(f"the earlier part's videos are kept in {kept}", flush=True)


class StopSignal:
    """Remembers that SLURM (or anyone) asked the job to stop: USR1 (the wall-time warning), TERM (preemption,
    scancel) or INT (Ctrl-C). The training loop checks `requested` at a step boundary, where a checkpoint is
    consistent. A second Ctrl-C (a second later or more: a wrapper may forward one interrupt twice at once) stops at
    once, without a resume file (any earlier one stays)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None
        self.first_int = 0.0
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT and time.time() - self.first_int < 1.0:
                return  # one interrupt delivered twice (a wrapper such as `uv run` or `timeout` forwarding it)
            if self.received == signal.SIGINT:
                print("\nsecond Ctrl-C: stopping now, without a new resume file", file=sys.stderr, flush=True)
                raise SystemExit(128 + signum)
            self.first_int = time.time()
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


def stop_for_requeue(stop: StopSignal, run_name: str = "") -> NoReturn:
    """After the resume file is written: on SLURM's time-limit warning (USR1) requeue this job, which restarts and
    resumes; then exit. TERM is not requeued here: `scancel` sends it too (and SLURM's state cannot tell the two
    apart at that moment), and a site that preempts with requeue requeues the job itself. Otherwise the exit status
    is the usual 128 + signal number, so a caller sees the run did not finish (the same command resumes it)."""
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

        run = Run(SCRIPT, args, run_name)          # run dir, device, wandb; reads a resume file if present
        run.attach(writer)                         # the script's SummaryWriter on runs/{run.name}
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

    def __init__(self, script: str, args: Any, default_name: str):
        self.script, self.args = script, args
        self.name = make_run_name(args.run_name, default_name)
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
        self._writer = None
        self.stop, self.clock = StopSignal(), CheckpointClock(args.checkpoint_minutes)
        self.start_time, self.start_step, self.last_progress, self._hinted = time.time(), 0, 0.0, False
        if self.saved is not None:
            keep_earlier_videos(self.name, self.saved["global_step"])
        what = f"resuming {self.dir} from global step {self.saved['global_step']}" if self.saved else f"run {self.dir}"
        print(f"{what} on {self.device}", flush=True)

    def attach(self, writer) -> None:
        """Adopt the script's own SummaryWriter (on runs/{run.name}). On resume it first marks the step after the
        resume file as a restart, so TensorBoard hides what the interrupted run logged after it (a SummaryWriter's
        `purge_step`, written into the open event file) and the curves continue without repeated steps."""
        if self.saved is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            step = self.saved["global_step"] + 1
            writer.file_writer.add_event(Event(step=step, file_version="brain.Event:2"))
            writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        self._writer = writer

    @property
    def writer(self):
        """The script's SummaryWriter, once `attach` has adopted it."""
        if self._writer is None:
            raise RuntimeError("Run.attach(writer) must come before the run logs, checkpoints or finishes")
        return self._writer

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
        fields = [field.replace(" nan", " none yet") for field in fields]  # a value logged before its first sample
        line = " | ".join([f"step {global_step}/{total}", f"SPS {sps:.1f}", *fields, f"{left} left"])
        print(line, flush=True)
        if sps > 0 and (total - global_step) / sps > 6 * 3600 and self.device.type == "cpu" and not self._hinted:
            self._hinted = True  # the defaults are the papers' GPU-scale runs: say once where the small ones are
            print(f"(more than 6 h left on a CPU: {self.script}'s defaults are the paper-scale GPU run; the README's "
                  "'First run' and docs/ give CPU presets that finish in minutes, with OMP_NUM_THREADS=1 per run)",
                  flush=True)

    def save_model(self, **state: Any) -> str:
        """`--save-model`: write runs/{run}/{exp_name}.cleanrl_model (with the script name and args); its path."""
        path = os.path.join(self.dir, f"{self.args.exp_name}.cleanrl_model")
        save_checkpoint(path, self.script, self.args, **state)
        print(f"model saved to {path}", flush=True)
        return path

    def finish(self, **counters: Any) -> None:
        """The end of training: the resume file now says where the run ended (so raising --total-timesteps extends
        it from there, never from an older file), and the logs are closed."""
        if self.saved is not None and counters["global_step"] == self.start_step:
            print(f"{self.dir} had already finished at global step {self.start_step}: nothing to do (raise "
                  "--total-timesteps to train it further)", flush=True)
        self._save_resume(counters)
        self.writer.close()
