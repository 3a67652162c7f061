"""Shared test helpers: run a script as a user would, and read back the TensorBoard scalars it wrote."""

import glob
import os
import subprocess
import sys

import pytest
import torch

# Tests run in parallel (pytest-xdist, one worker per core): keep each worker, and the scripts it starts, on one thread.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str, cwd: str, timeout: float = 600, check: bool = True):
    """Run `python <repo>/<script> <args>` in `cwd` with one BLAS/OpenMP thread (tiny runs are faster that way)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files in `run_dir`, as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        accumulator = EventAccumulator(event_file, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def only_run_dir(cwd: str) -> str:
    """The single run directory a script created under `cwd/runs`."""
    run_dirs = glob.glob(os.path.join(cwd, "runs", "*"))
    assert len(run_dirs) == 1, f"expected one run directory, found {run_dirs}"
    return run_dirs[0]


@pytest.fixture
def workdir(tmp_path):
    """A fresh directory to run a script in, so its runs/ and videos/ land in the test's temporary folder."""
    return str(tmp_path)
