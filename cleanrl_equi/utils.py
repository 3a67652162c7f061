"""Start-up checks and checkpoint files shared by the training scripts.

A mistake a user can make (a bad flag, a missing file) should stop the script with one sentence that names the
fix, not a stack trace from deep inside training: `fail` prints that sentence and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

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


def load_checkpoint(path: str, script: str, map_location: str | torch.device = "cpu") -> dict:
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
        fail(f"checkpoint {path!r} was written by {payload['script']}, not {script}; evaluate it with that script.")
    return payload
