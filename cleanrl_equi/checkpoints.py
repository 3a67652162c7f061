"""Checkpoint files: `--save-model`'s model file and a run's resume file, written atomically and read back with one
sentence for every way they can be unusable (missing, a folder, corrupt, another script's, other shapes).
"""

from __future__ import annotations

import contextlib
import os
import random
import typing
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import torch

from cleanrl_equi.errors import fail, refuse_folder, write_error

RESUME_FILE = "resume.pt"
RESUMABLE_CHANGES = ("total_timesteps", "checkpoint_minutes", "progress_interval", "cuda", "track",
                     "wandb_project_name", "wandb_entity", "save_model", "capture_video", "run_name")
"""The common CleanRL flags that may differ between an interrupted run and its resumption (a longer run, another
checkpoint interval, tracking turned on); any other difference is refused."""


def derived_fields(args: Any) -> tuple[str, ...]:
    """Fields a user cannot set (`tyro.conf.Suppress`, filled in at run time from other flags, such as PPO's
    `num_iterations`): they follow the flags that are compared, so they are not compared themselves."""
    if not is_dataclass(args):
        return ()
    hints = typing.get_type_hints(type(args), include_extras=True)
    return tuple(f.name for f in fields(args)
                 if typing.get_origin(hints.get(f.name)) is typing.Annotated
                 and any("Suppress" in type(m).__name__ or "Suppress" in repr(m) for m in hints[f.name].__metadata__))


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


def load_checkpoint(path: str, script: str, map_location: str | torch.device = "cpu",
                    fix: str = "evaluate it with that script", unreadable_fix: str = "") -> dict:
    """Read a checkpoint written by `save_checkpoint` for `script`, failing with one sentence if it cannot be used
    (`unreadable_fix`: what to do about a corrupt file, where there is something to do)."""
    refuse_folder(path, "checkpoint", ".cleanrl_model")
    if not os.path.isfile(path):
        fail(f"checkpoint {path!r} does not exist; pass the path of a file written with --save-model.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # any unpickling problem means the file is not a usable checkpoint
        fix = f"; {unreadable_fix}" if unreadable_fix else ""
        fail(f"checkpoint {path!r} could not be read ({type(exc).__name__}); it is corrupt or not a checkpoint{fix}.")
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


def saved_weights(payload: dict, key: str, path: str, in_resume: str | None = None) -> dict:
    """The state dict `key` ("actor", "model", ...) of a model file or of a resume file (which keeps the same
    weights under "state", as `in_resume` where the script keeps them under another name than its model file),
    with one sentence when the file holds no such network."""
    if key in payload:
        return payload[key]
    if (in_resume or key) in payload.get("state", {}):
        return payload["state"][in_resume or key]
    fail(f"checkpoint {path!r} holds no {key} weights; pass a model file written with --save-model or a run's "
         f"{RESUME_FILE}.")


def saved_args(payload: dict, args_class: type, path: str, required: tuple[str, ...] = ()) -> Any:
    """The settings a checkpoint was trained with, as `args_class` (flags added since then take their defaults).
    `required` names settings whose defaults have changed since older files were written: a file without them is
    refused with one sentence rather than evaluated under settings it was not trained with."""
    missing = [name for name in required if name not in payload["args"]]
    if missing:
        fail(f"checkpoint {path!r} was written before {', '.join(missing)} were recorded, so the env it was trained "
             "in is unknown; train it again with this version.")
    known = {f.name for f in fields(args_class)}
    return args_class(**{k: v for k, v in payload["args"].items() if k in known})


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
    payload = load_checkpoint(path, script, fix="this run directory belongs to that script; pick another --run-name",
                              unreadable_fix="delete it to start the run over, or pick another --run-name")
    now = dict(vars(args))
    # a flag added since the file was written counts as its default there (the run had no other choice then)
    defaults = {f.name: f.default for f in fields(args)} if is_dataclass(args) else {}
    saved = {**{k: v for k, v in defaults.items() if k not in payload["args"]}, **payload["args"]}
    free = RESUMABLE_CHANGES + derived_fields(args)
    changed = sorted(k for k in set(saved) | set(now) if k not in free and saved.get(k) != now.get(k))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} there, {now.get(k)!r} now)" for k in changed)
        fail(f"{path!r} was saved with other settings: {flags}; resume with the same flags or pick a new --run-name.")
    return payload
