"""The test kit shared by every test file: run a script as a user would, load a script as a module, read back the
TensorBoard scalars a run wrote, assert exact equivariance, and assert that a mistake stops with one sentence."""

import glob
import importlib.util
import os
import signal
import subprocess
import sys
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

import cleanrl_equi  # noqa: F401  (first: it stands in for lie_learn before any test module imports escnn)

# Tests run in parallel (pytest-xdist, one worker per core): keep each worker, and the scripts it starts, on one thread.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUARTER_TURN = np.array([[0.0, -1.0], [1.0, 0.0]])  # +90 degrees about +z acting on (dx, dy)


def run_script(script: str, *args: str, cwd: str, timeout: float = 600, check: bool = True, env: dict | None = None):
    """Run `python <repo>/<script> <args>` in `cwd` with one BLAS/OpenMP thread (tiny runs are faster that way)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def stop_with_signal(script: str, *args: str, cwd: str, at: str = "step ", signum: int = signal.SIGUSR1,
                     timeout: float = 300) -> str:
    """Start `python <repo>/<script> <args>` in `cwd`, send it `signum` (SLURM's time-limit warning by default) when
    a line of its output starts with `at` (the progress lines start with "step N/": the loop is running and has
    installed its handlers), and check it stops with exit status 128 + signum. Returns its whole output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):  # never requeue a real SLURM job
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    try:
        for line in proc.stdout:
            output += line
            if line.startswith(at):
                proc.send_signal(signum)
                break
        output += proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, f"{script} exited with {proc.returncode}:\n{output}"
    return output


_loaded: dict[str, object] = {}


def load_script(name: str):
    """The training script `<repo>/<name>.py` as a module (its training runs only under __main__), loaded once."""
    if name not in _loaded:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


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


def max_equivariance_error(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                           group_actions: Sequence[tuple[Callable, Callable]]) -> float:
    """Largest |fn(g·x) - g·fn(x)| over the inputs and every group element g, given as (how g acts on the input,
    how g acts on the output). Use elements that act exactly on the pixel grid (flips, multiples of 90 degrees), so
    the check holds to float error without interpolation."""
    with torch.no_grad():
        reference = fn(inputs)
        return max((fn(act_in(inputs)) - act_out(reference)).abs().max().item() for act_in, act_out in group_actions)


def assert_equivariant(fn, inputs, group_actions, tolerance: float = 1e-5) -> float:
    """`fn` commutes with every group element to `tolerance`; returns the error."""
    error = max_equivariance_error(fn, inputs, group_actions)
    assert error < tolerance, f"equivariance error {error:.3g} >= {tolerance}"
    return error


def one_sentence(stderr: str, *words: str) -> str:
    """stderr holds exactly one non-empty line, `error: ...`, containing every word; returns it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def fails_with(capsys, words: Sequence[str], function: Callable, *args, **kwargs) -> str:
    """Calling `function` in this process stops with exit status 2 and one `error:` sentence naming `words`."""
    with pytest.raises(SystemExit) as raised:
        function(*args, **kwargs)
    assert raised.value.code == 2
    return one_sentence(capsys.readouterr().err, *words)


def script_fails_with(proc, *words: str) -> str:
    """A finished script process stopped with exit status 2 and one `error:` sentence naming `words`."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return one_sentence(proc.stderr, *words)


@pytest.fixture
def workdir(tmp_path):
    """A fresh directory to run a script in, so its runs/ and videos/ land in the test's temporary folder."""
    return str(tmp_path)


def manipulation_observations(tasks=("BlockPulling", "BlockPicking"), image_size: int = 32, steps: int = 4,
                              seed: int = 5) -> torch.Tensor:
    """Real observations along planner episodes, as the networks take them (float (B, 2, S, S): height / 255, the
    holding flag 0/1); the picking task makes the gripper hold its block, so both flag values appear."""
    import gymnasium as gym

    observations = []
    for task in tasks:
        env = gym.make(f"cleanrl_equi/{task}-v0", image_size=image_size).unwrapped
        obs, _ = env.reset(seed=seed)
        observations.append(obs)
        for _ in range(steps):
            obs, _, terminated, truncated, _ = env.step(env.expert_action())
            if terminated or truncated:
                break
            observations.append(obs)
        env.close()
    return torch.as_tensor(np.stack(observations)).float() / 255.0
