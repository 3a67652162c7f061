"""Resumable runs of the on-policy scripts (ppo_atari.py, ppo_atari_equi.py, rpo_mujoco.py).

A run that SLURM warns with USR1 writes runs/{run_name}/resume.pt at the end of the iteration and exits with 128 + the
signal (no SLURM here, so no requeue); the same command then continues from the same global step. TensorBoard must
show every iteration exactly once across the event files of all the processes of the run. Each script start costs a
few seconds of imports, so every test starts as few as it can.
"""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO, read_scalars, run_script, script_fails_with

# Tiny runs: an iteration takes a fraction of a second. The Atari scripts print a progress line every iteration with
# --progress-interval 0; rpo_mujoco.py prints one after its first iteration (its first progress line comes at once).
ATARI = ["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1",
         "--progress-interval", "0"]
ATARI_BATCH = 16
RPO = ["--env-id", "Hopper-v5", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1"]
RPO_BATCH, RPO_ITERATIONS = 32, 6
RUN = ["--run-name", "r"]


def interrupt(script: str, *flags: str, cwd: str, at_line: int = 1, on_line=None) -> dict:
    """Start a training run and send it SIGUSR1 (SLURM's time-limit warning) at its `at_line`-th progress line
    (`on_line(n)` is called at each); check it wrote its resume file and exited with 128 + SIGUSR1. Returns the file."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):  # never requeue a real SLURM job
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), *flags], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, lines = "", 0
        for line in proc.stdout:  # progress lines come after the training loop installed its signal handlers
            output += line
            if line.startswith("step "):
                lines += 1
                if on_line is not None:
                    on_line(lines)
                if lines == at_line:
                    proc.send_signal(signal.SIGUSR1)
                    break
        output += proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, f"{script} exited with {proc.returncode}:\n{output}"
    assert "SIGUSR1 received: checkpoint written; run the same command with --run-name r to resume" in output, output
    return read_resume_file(os.path.join(cwd, "runs", "r", "resume.pt"))


def read_resume_file(path: str) -> dict:
    """A resume file's counters (global step, iteration) and state (normalisation statistics, ...), flat."""
    payload = torch.load(path, weights_only=False)
    return {**payload["state"], **payload["counters"]}


def logged(run_dir: str, tag: str = "charts/learning_rate") -> tuple[list[tuple[int, float]], list[int]]:
    """`tag` as TensorBoard shows the run directory (one accumulator reads the event files in order and applies the
    purge a resumed process asks for), and the steps in the event files read one by one (conftest.read_scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    shown = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return shown, sorted(step for step, _ in read_scalars(run_dir)[tag])


def hyperparameter_tables(run_dir: str) -> int:
    """How many event files hold the hyperparameter table (a resumed process must not log it again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    count = 0
    for name in os.listdir(run_dir):
        if name.startswith("events.out.tfevents."):
            accumulator = EventAccumulator(os.path.join(run_dir, name))
            accumulator.Reload()
            count += "hyperparameters/text_summary" in accumulator.Tags()["tensors"]
    return count


def check_logs(run_dir: str, batch: int, iterations: int, twice: list[int], learning_rate: float,
               resumed_at: dict) -> None:
    """TensorBoard shows each iteration once, with the learning rate annealed over `iterations` from the resumed
    iteration on; the event files hold the steps in `twice` a second time (logged after the resume file)."""
    shown, union = logged(run_dir)
    every_iteration = [batch * i for i in range(1, iterations + 1)]
    assert [step for step, _ in shown] == every_iteration  # unique, no gap, up to the (rounded) total
    assert union == sorted(every_iteration + twice)
    resumed = [value for step, value in shown if step > resumed_at["global_step"]]
    annealed = [learning_rate * (1 - (i - 1) / iterations) for i in range(resumed_at["iteration"] + 1, iterations + 1)]
    assert np.allclose(resumed, annealed, rtol=1e-5)  # the iteration count went on from the resume file
    assert hyperparameter_tables(run_dir) == 1


def test_ppo_atari_periodic_checkpoint_resumes_and_hides_later_logs(workdir):
    """A checkpoint every iteration (the clock); the job is then stopped by USR1, but the resume file is put back to
    an older periodic one, as if the job had been killed without warning: the resumed process must hide the logs of
    the steps after that file."""
    iterations = 5
    flags = [*ATARI, "--total-timesteps", str(ATARI_BATCH * iterations), *RUN, "--checkpoint-minutes", "1e-6"]
    resume_file = os.path.join(workdir, "runs", "r", "resume.pt")
    older = resume_file + ".older"

    def keep_older(line: int) -> None:
        if line == 2:  # the first iteration's periodic checkpoint is written by now
            shutil.copy(resume_file, older)

    stopped = interrupt("ppo_atari.py", *flags, cwd=workdir, at_line=3, on_line=keep_older)
    checkpoint = read_resume_file(older)
    assert checkpoint["global_step"] < stopped["global_step"] < ATARI_BATCH * iterations
    os.replace(older, resume_file)
    proc = run_script("ppo_atari.py", *flags, cwd=workdir)
    assert f"resuming runs/r from global step {checkpoint['global_step']}" in proc.stdout, proc.stdout
    twice = list(range(checkpoint["global_step"] + ATARI_BATCH, stopped["global_step"] + 1, ATARI_BATCH))
    check_logs(os.path.join(workdir, "runs", "r"), ATARI_BATCH, iterations, twice, 2.5e-4, checkpoint)


def test_ppo_atari_equi_resumes_where_usr1_stopped_it_and_refuses_another_scripts_file(workdir):
    iterations = 3
    flags = [*ATARI, "--total-timesteps", str(ATARI_BATCH * iterations), *RUN, "--checkpoint-minutes", "0"]
    stopped = interrupt("ppo_atari_equi.py", *flags, cwd=workdir)
    assert stopped["global_step"] == ATARI_BATCH * stopped["iteration"] < ATARI_BATCH * iterations
    # the resume file of another script in the run directory
    os.makedirs(os.path.join(workdir, "runs", "other"))
    shutil.copy(os.path.join(workdir, "runs", "r", "resume.pt"), os.path.join(workdir, "runs", "other"))
    other = [*ATARI, "--total-timesteps", str(ATARI_BATCH * iterations), "--run-name", "other"]
    script_fails_with(run_script("ppo_atari.py", *other, cwd=workdir, check=False),
                     "was written by ppo_atari_equi, not ppo_atari")
    proc = run_script("ppo_atari_equi.py", *flags, cwd=workdir)
    assert f"resuming runs/r from global step {stopped['global_step']}" in proc.stdout, proc.stdout
    # the stop came after the iteration's logs: no step is logged twice
    check_logs(os.path.join(workdir, "runs", "r"), ATARI_BATCH, iterations, [], 2.5e-4, stopped)


def test_rpo_mujoco_resumes_with_more_timesteps_and_refuses_other_settings(workdir):
    flags = [*RPO, *RUN, "--checkpoint-minutes", "0", "--eval-episodes", "1"]
    stopped = interrupt("rpo_mujoco.py", *flags, "--total-timesteps", str(RPO_BATCH * RPO_ITERATIONS), cwd=workdir)
    assert stopped["global_step"] == RPO_BATCH * stopped["iteration"] < RPO_BATCH * RPO_ITERATIONS
    # more envs: another batch and other normalisation statistics, refused before anything is built
    proc = run_script("rpo_mujoco.py", *flags, "--total-timesteps", str(RPO_BATCH * RPO_ITERATIONS), "--num-envs",
                      "2", cwd=workdir, check=False)
    script_fails_with(proc, "--num-envs (1 there, 2 now)")
    iterations = RPO_ITERATIONS + 3  # --total-timesteps may be raised on resume (and is rounded down to iterations)
    total = RPO_BATCH * iterations
    proc = run_script("rpo_mujoco.py", *flags, "--total-timesteps", str(total + 10), "--save-model", cwd=workdir)
    assert f"resuming runs/r from global step {stopped['global_step']}" in proc.stdout, proc.stdout
    assert f"step {total}/{total} | SPS" in proc.stdout, proc.stdout
    check_logs(os.path.join(workdir, "runs", "r"), RPO_BATCH, iterations, [], 3e-4, stopped)
    # the observation statistics went on from the saved ones: a fresh tracker would have counted fewer observations
    saved = torch.load(os.path.join(workdir, "runs", "r", "rpo_mujoco.cleanrl_model"), weights_only=False)
    count = stopped["normalization"][0]["obs_rms"]["count"]
    assert saved["obs_rms"]["count"] >= count + total - stopped["global_step"]
