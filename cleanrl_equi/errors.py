"""One-sentence errors: a mistake a user can make (a bad flag, a missing file, a full disk) stops the script with
one sentence that names the fix, never a stack trace from deep inside training.

`fail` prints that sentence as `error: ...` on stderr and exits with status 2 (the usual status for bad usage).
`require` checks the ranges of a script's numeric flags, and that every float flag is a finite number.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from dataclasses import fields, is_dataclass
from typing import Any, NoReturn


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def flag(name: str) -> str:
    """The command-line spelling of an Args field: `learning_rate` -> `--learning-rate`."""
    return f"--{name.replace('_', '-')}"


def require_finite(args: Any) -> None:
    """Every float field of the dataclass `args` must be a finite number: an infinite learning rate or a NaN weight
    passes every range check and would only surface minutes later, inside an update."""
    for field in fields(args) if is_dataclass(args) else ():
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(field.name)} must be a finite number, not {value}.")


def require(args: Any, positive: tuple[str, ...] = (), fractions: tuple[str, ...] = (),
            non_negative: tuple[str, ...] = (), at_least_one: tuple[str, ...] = ()) -> None:
    """Stop with one sentence naming the flag when a setting is out of its range: `positive` (> 0: learning rates,
    temperatures), `fractions` (in [0, 1]: discounts, Polyak coefficients), `non_negative`, `at_least_one` (counts).
    Always checked: every float flag is finite, and the seed lies in [0, 2^32) (NumPy's seeds)."""
    require_finite(args)
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be a whole number from 0 to 2^32 - 1, not {args.seed}.")
    for names, ok, rule in ((positive, lambda v: v > 0, "must be positive"),
                            (fractions, lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
                            (non_negative, lambda v: v >= 0, "must not be negative"),
                            (at_least_one, lambda v: v >= 1, "must be at least 1")):
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                fail(f"{flag(name)} {rule}, not {value}.")


def require_range(args: Any, name: str, low: float, high: float, unit: str = "", why: str = "") -> None:
    """One sentence unless `low <= args.name <= high` (a finite number)."""
    value = getattr(args, name)
    if not (math.isfinite(value) and low <= value <= high):
        unit = f" {unit}" if unit else ""
        why = f" ({why})" if why else ""
        fail(f"{flag(name)} must be in [{low}, {high}]{unit}{why}, not {value}.")


def write_error(path: str, exc: OSError) -> NoReturn:
    """One sentence for a file that cannot be written: a full disk, a read-only or missing folder, no permission."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    fix = {errno.ENOSPC: "free some space (or point the run elsewhere) and run the same command again",
           errno.EDQUOT: "free some of your quota and run the same command again",
           errno.EROFS: "run from a writable folder (runs/ is created in the working directory)",
           errno.EACCES: "run from a folder you may write to (runs/ is created in the working directory)"}
    fail(f"cannot write {path!r} ({reason}); {fix.get(exc.errno, 'check the folder and run the same command again')}.")


def refuse_folder(path: str, what: str, suffix: str) -> None:
    """One sentence when a folder is given where a file is expected, naming a file inside it if there is one."""
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith(suffix))
        hint = f" such as {os.path.join(path, found[0])!r}" if found else ""
        fail(f"{what} {path!r} is a folder; pass the {suffix} file{hint}.")
