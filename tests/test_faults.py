"""Nothing lost, nothing cryptic: finished runs extend safely, Ctrl-C / a full disk / a read-only folder stop with a
resume file or one sentence, run directories are never shared between runs, and bad input stops at start-up with
one sentence (exit status 2). The faults are real where the machine allows it: a real SIGINT, a read-only and a
tiny tmpfs mounted for the test (root), else an unwritable folder and /dev/full (which fails every write with
ENOSPC)."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from cleanrl_equi.buffers import ReplayBuffer
from cleanrl_equi.datasets import collect_expert, save_dataset
from conftest import REPO, fails_with, load_script, read_scalars, run_script, script_fails_with, stop_with_signal

PPO = ["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1"]
PPO_BATCH = 16
SAC = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8", "--learning-starts", "8",
       "--num-envs", "2", "--max-steps", "6", "--eval-frequency", "1000", "--eval-episodes", "1",
       "--num-eval-envs", "1", "--log-frequency", "4"]


def steps_shown(run_dir: str, tag: str = "charts/SPS") -> list[int]:
    """The steps of `tag` as TensorBoard shows them (event files in order, with the purge a resumed process asks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


# ---- Finished runs extend from where they ended ---------------------------------------------------------------------
def test_stopped_resumed_finished_run_extends_from_its_end(workdir):
    """The README's way to extend a run (same --run-name, larger --total-timesteps) after a stop, a resume and a
    finish must continue from the finish, not from the resume file the stop wrote (whose purge would delete the
    finished steps)."""
    flags = [*PPO, "--run-name", "r", "--checkpoint-minutes", "0", "--progress-interval", "0"]
    output = stop_with_signal("ppo_atari.py", *flags, "--total-timesteps", str(4 * PPO_BATCH), cwd=workdir)
    assert "run the same command with --run-name r to resume" in output
    run_script("ppo_atari.py", *flags, "--total-timesteps", str(4 * PPO_BATCH), cwd=workdir)  # resumes, finishes
    extended = run_script("ppo_atari.py", *flags, "--total-timesteps", str(6 * PPO_BATCH), cwd=workdir)
    assert f"resuming runs/r from global step {4 * PPO_BATCH}" in extended.stdout, extended.stdout
    run_dir = os.path.join(workdir, "runs", "r")
    assert steps_shown(run_dir) == [PPO_BATCH * i for i in range(1, 7)]  # nothing purged, nothing twice


def test_run_directories_are_never_shared(workdir):
    """A finished run without a resume file (an older version's, or one whose files were moved) and another script's
    run directory are refused; nothing in them changes."""
    run_script("ppo_atari.py", *PPO, "--total-timesteps", str(PPO_BATCH), "--run-name", "mine", cwd=workdir)
    run_dir = os.path.join(workdir, "runs", "mine")
    before = sorted(os.listdir(run_dir))
    script_fails_with(run_script("ppo_atari_equi.py", *PPO, "--total-timesteps", str(PPO_BATCH), "--run-name", "mine",
                                 cwd=workdir, check=False), "holds a run of ppo_atari, not ppo_atari_equi")
    os.remove(os.path.join(run_dir, "resume.pt"))
    before = sorted(os.listdir(run_dir))
    script_fails_with(run_script("ppo_atari.py", *PPO, "--total-timesteps", str(PPO_BATCH), "--run-name", "mine",
                                 cwd=workdir, check=False), "without a resume file", "pick another --run-name")
    assert sorted(os.listdir(run_dir)) == before


# ---- Stops: Ctrl-C, full disk, read-only folder ---------------------------------------------------------------------
def test_ctrl_c_stops_with_a_resume_file_and_no_traceback(workdir):
    flags = [*PPO, "--total-timesteps", str(50 * PPO_BATCH), "--run-name", "r", "--checkpoint-minutes", "0",
             "--progress-interval", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "ppo_atari.py"), *flags], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "Ctrl-C: stopping after this step" in stderr
    assert "SIGINT received: checkpoint written; run the same command with --run-name r to resume" in stdout
    saved = torch.load(os.path.join(workdir, "runs", "r", "resume.pt"), weights_only=False)
    resumed = run_script("ppo_atari.py", *flags[:-6], "--total-timesteps", str(saved["global_step"] + PPO_BATCH),
                         "--run-name", "r", cwd=workdir)
    assert f"resuming runs/r from global step {saved['global_step']}" in resumed.stdout


@contextlib.contextmanager
def mounted_tmpfs(options: str):
    """A fresh tmpfs mounted with `options` (needs root and mount permission), or None where that is not possible."""
    path = tempfile.mkdtemp()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                                                   capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", path], capture_output=True)
        os.rmdir(path)


def test_full_disk_at_save_model_stops_with_one_sentence_and_leaves_no_partial_file(workdir):
    with mounted_tmpfs("size=1m") as small:
        cwd = small or workdir
        if small is None:  # no mount: the checkpoint's temporary file is /dev/full, which fails writes with ENOSPC
            os.makedirs(os.path.join(cwd, "runs", "r"))
            os.symlink("/dev/full", os.path.join(cwd, "runs", "r", "ppo_atari.cleanrl_model.tmp"))
        # the Nature CNN's 6.7 MB checkpoint does not fit in 1 MB (the logs do)
        proc = run_script("ppo_atari.py", *PPO, "--total-timesteps", str(PPO_BATCH), "--run-name", "r",
                          "--save-model", cwd=cwd, check=False)
        script_fails_with(proc, "cannot write", "No space left on device", "free some space")
        left = os.listdir(os.path.join(cwd, "runs", "r"))
        assert not any(name.endswith(".tmp") for name in left) and "ppo_atari.cleanrl_model" not in left, left
        if small is not None:
            assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize > 700_000  # the space came back


def test_read_only_working_folder_stops_with_one_sentence(workdir):
    with mounted_tmpfs("ro,size=1m") as read_only:
        if read_only is None:
            if os.geteuid() == 0:
                pytest.skip("root without mount permission: no way to make a folder read-only for this test")
            read_only = os.path.join(workdir, "locked")
            os.makedirs(read_only, mode=0o555)
        proc = run_script("ppo_atari.py", *PPO, "--total-timesteps", str(PPO_BATCH), cwd=read_only, check=False)
        script_fails_with(proc, "cannot write", "runs/", "writable folder" if os.geteuid() == 0 else "write")


# ---- Resume files hold only the filled part of the replay buffer -----------------------------------------------------
def test_sac_resume_file_holds_only_the_filled_buffer_and_exact_demo_count(workdir):
    flags = [*SAC, "--buffer-size", "20000", "--num-envs", "5", "--num-demos", "2", "--total-timesteps", "20",
             "--run-name", "r"]
    proc = run_script("sac_equi_bullet.py", *flags, cwd=workdir)
    assert "2 demo episodes:" in proc.stdout, proc.stdout  # not one per env
    path = os.path.join(workdir, "runs", "r", "resume.pt")
    saved = torch.load(path, weights_only=False)["state"]["replay_buffer"]
    rows = saved["filled"]
    assert rows < 20 and len(saved["heights"]) == rows  # 20000 slots / 5 envs = 4000 rows; a handful are used
    assert os.path.getsize(path) < 1_000_000  # the empty 4000-row buffer alone would be 20 MB at 32 px
    rb = ReplayBuffer(20000, 5, 32)
    rb.load_state_dict(saved)
    assert len(rb) == int(saved["valid"].sum()) > 0


# ---- Bad input: one sentence at start-up -----------------------------------------------------------------------------
@pytest.mark.parametrize("script, flags, words", [
    ("ppo_atari", {"learning_rate": -1e-4}, "--learning-rate must be positive"),
    ("ppo_atari", {"gamma": 1.5}, "--gamma must lie in [0, 1]"),
    ("ppo_atari", {"seed": -1}, "--seed must be a whole number from 0"),
    ("ppo_atari_equi", {"learning_rate": 0.0}, "--learning-rate must be positive"),
    ("rpo_mujoco", {"learning_rate": -3e-4}, "--learning-rate must be positive"),
    ("rpo_mujoco", {"seed": -1}, "--seed"),
    ("sac_equi_bullet", {"policy_lr": -1e-3}, "--policy-lr must be positive"),
    ("sac_equi_bullet", {"q_lr": -1e-3}, "--q-lr must be positive"),
    ("sac_equi_bullet", {"gamma": 1.5}, "--gamma must lie in [0, 1]"),
    ("sac_equi_bullet", {"seed": -1}, "--seed"),
    ("sac_equi_bullet", {"image_size": 100}, "power of two from 16 to 1024"),
    ("cql_equi_offline", {"alpha_lr": -1.0}, "--alpha-lr must be positive"),
    ("cql_equi_offline", {"gamma": 2.0}, "--gamma must lie in [0, 1]"),
    ("iql_equi_offline", {"value_lr": -1.0}, "--value-lr must be positive"),
    ("iql_equi_offline", {"seed": -5}, "--seed"),
])
def test_out_of_range_settings_stop_with_one_sentence(script, flags, words, capsys):
    module = load_script(script)
    fails_with(capsys, [words], module.check_args, module.Args(**flags))


def test_image_size_512_is_accepted(capsys):
    sac = load_script("sac_equi_bullet")
    sac.check_args(sac.Args(image_size=512))  # the encoder halves 512 down to 8 like any other power of two
    assert [width for width, _, _ in sac.layer_plan(64, 512)][:2] == [2, 4]


@pytest.mark.parametrize("script", ["ppo_atari.py", "rpo_mujoco.py"])
def test_derived_sizes_are_not_flags(script, workdir):
    """--batch-size, --minibatch-size and --num-iterations follow from other flags; they are not offered."""
    proc = run_script(script, "--batch-size", "4096", cwd=workdir, check=False)
    assert proc.returncode == 2 and "--batch-size" in proc.stderr and "Traceback" not in proc.stderr
    assert "--num-iterations" not in run_script(script, "--help", cwd=workdir).stdout


def test_track_without_wandb_says_how_to_install_it(workdir):
    pytest.importorskip("cleanrl_equi")
    if subprocess.run([sys.executable, "-c", "import wandb"], capture_output=True).returncode == 0:
        pytest.skip("wandb is installed here")
    proc = run_script("ppo_atari.py", *PPO, "--total-timesteps", str(PPO_BATCH), "--track", cwd=workdir, check=False)
    script_fails_with(proc, "--track", "wandb")


def test_a_folder_given_as_checkpoint_or_dataset_is_named_as_such(workdir):
    os.makedirs(os.path.join(workdir, "runs", "x"))
    open(os.path.join(workdir, "runs", "x", "ppo_atari.cleanrl_model"), "w").close()
    script_fails_with(run_script("ppo_atari.py", "--eval-checkpoint", "runs/x", cwd=workdir, check=False),
                      "is a folder", "runs/x/ppo_atari.cleanrl_model")
    script_fails_with(run_script("iql_equi_offline.py", "--dataset", "runs", cwd=workdir, check=False),
                      "is a folder", ".npz")


def test_dataset_smaller_than_a_batch_is_refused(workdir):
    path = os.path.join(workdir, "tiny.npz")
    save_dataset(path, collect_expert("cleanrl_equi/BlockPulling-v0", 1, seed=0, image_size=32, max_steps=6))
    proc = run_script("cql_equi_offline.py", "--dataset", path, "--image-size", "32", "--max-steps", "6",
                      "--batch-size", "64", "--group-order", "4", "--n-hidden", "8", cwd=workdir, check=False)
    script_fails_with(proc, "fewer than --batch-size 64")
    assert not os.path.exists(os.path.join(workdir, "runs"))


def test_capture_video_records_the_final_evaluation_without_save_model(workdir):
    proc = run_script("sac_equi_bullet.py", *SAC, "--num-demos", "1", "--total-timesteps", "16", "--capture-video",
                      cwd=workdir)
    assert "final eval:" in proc.stdout and "evaluation seed" in proc.stdout
    videos = [name for _, _, files in os.walk(os.path.join(workdir, "videos")) for name in files]
    assert any(name.endswith(".mp4") for name in videos), videos
    scalars = read_scalars(os.path.join(workdir, "runs", os.listdir(os.path.join(workdir, "runs"))[0]))
    assert np.isfinite([v for _, v in scalars["losses/qf1_loss"]]).all()


def test_learning_benchmark_skips_a_run_stopped_before_its_first_update(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    stopped = SummaryWriter(str(runs / "BreakoutNoFrameskip-v4__ppo_atari__1__1"))  # only the hyperparameter table
    stopped.add_text("hyperparameters", "|param|value|\n|-|-|\n|seed|1|")
    stopped.close()
    done = SummaryWriter(str(runs / "BreakoutNoFrameskip-v4__ppo_atari_equi__1__2"))
    for step in range(1, 5):
        done.add_scalar("charts/episodic_return", float(step), 25_000 * step)
    done.close()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "atari_learning.py"), "--runs", str(runs),
                           "--bin-steps", "25000", "--out", str(tmp_path / "curves.json")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stopped before its first update" in proc.stdout
    assert (tmp_path / "curves.json").is_file()


# ---- What a user tried on a fresh clone -----------------------------------------------------------------------------
def test_one_interrupt_delivered_twice_at_once_still_writes_the_resume_file(workdir):
    """`timeout -s INT` under `uv run` delivers the interrupt twice within a moment: that is one Ctrl-C (stop after
    the step with a resume file), not "Ctrl-C again" (stop at once without one); the same command then resumes."""
    flags = [*PPO, "--total-timesteps", str(50 * PPO_BATCH), "--run-name", "r", "--checkpoint-minutes", "0",
             "--progress-interval", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "ppo_atari.py"), *flags], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    assert "second Ctrl-C" not in stderr and os.path.isfile(os.path.join(workdir, "runs", "r", "resume.pt"))
    resumed = run_script("ppo_atari.py", *flags[:-6], "--total-timesteps", str(51 * PPO_BATCH), "--run-name", "r",
                         cwd=workdir)
    assert "resuming runs/r from global step" in resumed.stdout


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_a_run_name_cannot_leave_runs(name, workdir):
    proc = run_script("ppo_atari.py", *PPO, "--total-timesteps", str(PPO_BATCH), "--run-name", name, cwd=workdir,
                      check=False)
    script_fails_with(proc, "--run-name", "plain folder name")
    assert sorted(os.listdir(workdir)) == []  # nothing written anywhere, runs/ included


@pytest.mark.parametrize("script, flag", [("ppo_atari.py", "--learning-rate"), ("ppo_atari_equi.py", "--ent-coef"),
                                          ("rpo_mujoco.py", "--learning-rate"), ("sac_equi_bullet.py", "--policy-lr"),
                                          ("dqn_equi_bullet.py", "--learning-rate"), ("cql_equi_offline.py", "--q-lr"),
                                          ("iql_equi_offline.py", "--gamma")])
def test_a_non_finite_hyperparameter_stops_at_start_up(script, flag, workdir):
    """An infinite or NaN value passes every range check; it would crash minutes later inside the update."""
    proc = run_script(script, flag, "inf" if flag != "--gamma" else "nan", cwd=workdir, check=False)
    script_fails_with(proc, flag, "finite number")
    assert not os.path.exists(os.path.join(workdir, "runs"))


def test_a_finished_run_says_so_and_its_resume_file_evaluates(workdir):
    """Re-running a finished run's command says it had finished (instead of a silent exit), a corrupt resume file
    names the way out, and --eval-checkpoint takes the resume file as well as the model file (same weights)."""
    flags = [*SAC, "--total-timesteps", "24", "--num-demos", "1", "--run-name", "r"]
    first = run_script("sac_equi_bullet.py", *flags, cwd=workdir)
    assert "pybullet build time" not in first.stdout + first.stderr  # pybullet's import chatter is kept out
    again = run_script("sac_equi_bullet.py", *flags, cwd=workdir)
    assert "had already finished at global step 24" in again.stdout and "raise --total-timesteps" in again.stdout
    resume_file = os.path.join(workdir, "runs", "r", "resume.pt")
    evaluated = run_script("sac_equi_bullet.py", "--eval-checkpoint", resume_file, "--eval-episodes", "1",
                           "--num-eval-envs", "1", cwd=workdir)
    assert "success" in evaluated.stdout and "Traceback" not in evaluated.stderr
    with open(resume_file, "wb") as f:
        f.write(b"corrupt")
    script_fails_with(run_script("sac_equi_bullet.py", *flags, cwd=workdir, check=False), "corrupt",
                      "delete it to start the run over")


@pytest.mark.parametrize("script", ["sac_equi_bullet.py", "dqn_equi_bullet.py", "cql_equi_offline.py",
                                    "iql_equi_offline.py"])
def test_zero_timesteps_is_refused_not_silently_done(script, workdir):
    script_fails_with(run_script(script, "--total-timesteps", "0", cwd=workdir, check=False), "--total-timesteps")
    assert not os.path.exists(os.path.join(workdir, "runs"))


def test_two_video_evaluations_keep_both_folders_with_one_video_per_episode(workdir):
    """--eval-checkpoint --capture-video writes a new folder each time (and says which), one video per episode
    asked for, and the two evaluations report the same numbers (the same seeds)."""
    run_script("sac_equi_bullet.py", *SAC, "--total-timesteps", "16", "--num-demos", "1", "--save-model",
               "--run-name", "r", cwd=workdir)
    model = os.path.join(workdir, "runs", "r", "sac_equi_bullet.cleanrl_model")
    outputs, folders = [], []
    for _ in range(2):
        proc = run_script("sac_equi_bullet.py", "--eval-checkpoint", model, "--eval-episodes", "3",
                          "--num-eval-envs", "2", "--capture-video", cwd=workdir)
        folder = proc.stdout.split("videos of the 3 episodes in ")[1].split()[0]
        folders.append(folder)
        outputs.append([line for line in proc.stdout.splitlines() if "success" in line])
        assert len([f for f in os.listdir(os.path.join(workdir, folder)) if f.endswith(".mp4")]) == 3
    assert folders[0] != folders[1] and outputs[0] == outputs[1]


def test_a_paper_scale_run_on_a_cpu_points_to_the_cpu_presets(workdir):
    """The defaults are the papers' GPU-scale runs: on a CPU the progress line's days-long estimate comes with one
    line that says where the minute-scale presets are."""
    output = stop_with_signal("ppo_atari.py", *PPO, "--progress-interval", "0", "--no-cuda", cwd=workdir,
                              at="(more than 6 h left on a CPU")
    assert "CPU presets" in output and "OMP_NUM_THREADS=1" in output and output.count("more than 6 h") == 1


def test_dqn_evaluates_its_resume_file_like_its_model_file(workdir):
    """--eval-checkpoint takes a run's resume.pt (the same Q network) as well as the --save-model file."""
    flags = ["--n-hidden", "8", "--image-size", "16", "--batch-size", "8", "--learning-starts", "8", "--num-envs", "2",
             "--num-demos", "0", "--max-steps", "6", "--buffer-size", "200", "--total-timesteps", "16",
             "--eval-frequency", "1000", "--eval-episodes", "2", "--num-eval-envs", "2", "--run-name", "q"]
    run_script("dqn_equi_bullet.py", *flags, "--save-model", cwd=workdir)
    lines = []
    for name in ("dqn_equi_bullet.cleanrl_model", "resume.pt"):
        proc = run_script("dqn_equi_bullet.py", "--eval-checkpoint", os.path.join(workdir, "runs", "q", name),
                          "--eval-episodes", "2", "--num-eval-envs", "2", cwd=workdir)
        lines.append([line for line in proc.stdout.splitlines() if "success" in line])
    assert lines[0] and lines[0] == lines[1]
