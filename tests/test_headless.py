"""rpo_mujoco.py on a headless node whose EGL library cannot be loaded (a GPU node without libegl1).

The node is imitated by putting files named libEGL.so, libEGL.so.0 ... libEGL.so.9 that are not libraries first
on LD_LIBRARY_PATH: PyOpenGL tries exactly those names, every one fails to load, and `import mujoco` with
MUJOCO_GL=egl then stops inside PyOpenGL with "AttributeError: 'NoneType' object has no attribute
'eglQueryString'", as it did on the GPU node. Training without video must not ask for any OpenGL backend there;
asking for video must stop with one sentence naming what to install.
"""

import os
import subprocess
import sys

import pytest
from conftest import REPO, only_run_dir, script_fails_with

SCRIPT = "rpo_mujoco.py"
TINY = ["--env-id", "Hopper-v5", "--num-envs", "1", "--num-steps", "32", "--total-timesteps", "64",
        "--num-minibatches", "2", "--update-epochs", "1", "--no-cuda", "--checkpoint-minutes", "0"]


@pytest.fixture
def no_egl(tmp_path):
    """Environment variables of a Linux node without a display whose libEGL cannot be loaded."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the EGL lookup imitated here is Linux's")
    broken = tmp_path / "broken_egl"
    broken.mkdir()
    for name in ["libEGL.so"] + [f"libEGL.so.{i}" for i in range(10)]:
        (broken / name).write_text("not a shared library\n")
    env = {name: value for name, value in os.environ.items()
           if name not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(broken), os.environ.get("LD_LIBRARY_PATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_rpo(*flags: str, cwd: str, env: dict) -> subprocess.CompletedProcess:
    """`python rpo_mujoco.py <flags>` in `cwd` with exactly the environment `env` (conftest's run_script adds to the
    caller's environment and could not take DISPLAY or MUJOCO_GL away)."""
    return subprocess.run([sys.executable, os.path.join(REPO, SCRIPT), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_node_is_imitated(no_egl):
    """Asking MuJoCo for EGL on the imitated node fails the way it did on the GPU node (so the tests below test
    something)."""
    proc = subprocess.run([sys.executable, "-c", "import mujoco"], env=dict(no_egl, MUJOCO_GL="egl"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "'NoneType' object has no attribute 'eglQueryString'" in proc.stderr, proc.stderr


def test_training_without_video_needs_no_opengl(no_egl, workdir):
    proc = run_rpo(*TINY, cwd=workdir, env=no_egl)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(only_run_dir(workdir))


def test_training_keeps_the_users_own_backend(no_egl, workdir):
    """A MUJOCO_GL the user set is theirs: "disable" (what got the GPU node going) still works."""
    proc = run_rpo(*TINY, cwd=workdir, env=dict(no_egl, MUJOCO_GL="disable"))
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_a_users_egl_without_the_library_is_one_sentence(no_egl, workdir):
    """MUJOCO_GL=egl set by the user on such a node: one sentence naming it and what to install, no traceback."""
    proc = run_rpo(*TINY, cwd=workdir, env=dict(no_egl, MUJOCO_GL="egl"))
    script_fails_with(proc, "MUJOCO_GL=egl", "libegl1")
    assert not os.path.exists(os.path.join(workdir, "runs")), "a failed start must not create a run"


def test_video_without_egl_says_what_to_install(no_egl, workdir):
    proc = run_rpo(*TINY, "--capture-video", cwd=workdir, env=no_egl)
    script_fails_with(proc, "--capture-video", "libegl1")
    assert not os.path.exists(os.path.join(workdir, "runs")), "a failed start must not create a run"
