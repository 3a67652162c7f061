"""Start-up checks, checkpoint files and resumable runs shared by the training scripts.

A mistake a user can make (a bad flag, a missing file) should stop the script with one sentence that names the
fix, not a stack trace from deep inside training: `fail` prints that sentence and exits with status 2.
"""

from __future__ import annotations

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


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2 (the usual exit status for bad usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def save_checkpoint(path: str, script: str, args: Any, **state: Any) -> None:
    """Write `state` (state_dicts, tensors, plain data) with the script name and its args to `path`, atomically.

    The file is written next to its final place and renamed, so an interrupted save (a SLURM time limit) never
    leaves a truncated checkpoint behind.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"script": script, "args": dict(vars(args)), **state}
    tmp_path = f"{path}.tmp"
    torch.save(payload, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path: str, script: str, map_location: str | torch.device = "cpu",
                    fix: str = "evaluate it with that script") -> dict:
    """Read a checkpoint written by `save_checkpoint` for `script`, failing with one sentence if it cannot be used."""
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


# ---- Runs that survive SLURM time limits and preemption ------------------------------------------------------------
# A training script keeps one resume file in its run directory, written every `--checkpoint-minutes` and when a
# signal says the job is about to stop: SLURM sends `--signal=B:USR1@<seconds>` before the wall-time limit and TERM
# on preemption or scancel. The script then asks SLURM to requeue the job and exits; the requeued job runs the same
# command, finds the same run directory (its name comes from the SLURM job id, or from --run-name) and continues
# from the same global step with the same network, optimiser and RNG state (and replay buffer, where there is one).
RESUME_FILE = "resume.pt"
RESUMABLE_CHANGES = ("total_timesteps", "num_iterations", "checkpoint_minutes", "progress_interval", "cuda", "track",
                     "wandb_project_name", "wandb_entity", "save_model", "capture_video", "run_name")
"""Flags that may differ between an interrupted run and its resumption (num_iterations: the PPO scripts derive it
from total_timesteps); any other difference is refused."""


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
    """Remembers that SLURM (or anyone) asked the job to stop: USR1 (the wall-time warning) or TERM (preemption,
    scancel). The training loop checks `requested` at a step boundary, where a checkpoint is consistent."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
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
    the same settings. Fails with one sentence if the file cannot be used. Restore its RNG state with
    `set_rng_state(resume["rng"])` once everything is built, right before the loop (building networks draws
    random numbers, which an uninterrupted run drew before its first step)."""
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


def load_state(module: Any, state: dict, path: str) -> None:
    """`module.load_state_dict(state)`, failing with one sentence when the shapes or names do not match."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"checkpoint {path!r} does not fit this network ({first[:160]}); it has other shapes or settings.")


def stop_for_requeue(stop: StopSignal) -> NoReturn:
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
    print(f"{name} received: checkpoint written; run the same command again to resume", flush=True)
    raise SystemExit(128 + (stop.received or 0))
