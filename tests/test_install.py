"""The install story: requirements.txt is the lock's full closure, escnn comes from PyPI unpatched, and neither py3nj nor
lie_learn (escnn's 3-D-only dependencies) is installed: NumPy 2 and Python 3.13 are open."""

import os
import re
import subprocess
import sys
import tomllib

import cleanrl_equi  # noqa: F401  (before escnn: it registers the stand-in for lie_learn, which is not installed)
import escnn

from conftest import REPO


def test_requirements_txt_matches_the_lock():
    with open(os.path.join(REPO, "uv.lock"), "rb") as f:
        lock = tomllib.load(f)
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["name"]
    locked = {p["name"]: p["version"] for p in lock["package"] if p["name"] != project}
    with open(os.path.join(REPO, "requirements.txt")) as f:
        pinned = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", f.read(), flags=re.MULTILINE))
    assert pinned == locked, (
        "requirements.txt has drifted from uv.lock; regenerate it with: uv export --frozen --no-hashes -o requirements.txt"
    )


def test_py3nj_is_left_out_and_escnn_is_the_released_package():
    with open(os.path.join(REPO, "uv.lock"), "rb") as f:
        names = {p["name"] for p in tomllib.load(f)["package"]}
    assert "py3nj" not in names and "lie-learn" not in names and "escnn" in names
    assert escnn.__file__.startswith(os.path.join(REPO, ".venv")) or "site-packages" in escnn.__file__
    assert not os.path.exists(os.path.join(REPO, "escnn"))


def test_escnn_runs_on_numpy_2_and_3d_code_stops_with_one_sentence():
    """Without lie_learn, `import escnn` works through cleanrl_equi's stand-in; the 2-D groups build and act, and the
    first SO(3) Wigner D-matrix stops with one sentence instead of an import error deep inside escnn."""
    code = """
import numpy, torch, cleanrl_equi
from escnn import group, gspaces, nn
assert int(numpy.__version__.split(".")[0]) >= 2, numpy.__version__
r2 = gspaces.rot2dOnR2(4)
conv = nn.R2Conv(nn.FieldType(r2, [r2.trivial_repr]), nn.FieldType(r2, [r2.regular_repr]), 3)
print(conv(nn.GeometricTensor(torch.randn(1, 1, 9, 9), conv.in_type)).shape)
so3 = group.so3_group(2)
so3.irrep(1)(so3.sample())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "torch.Size([1, 4, 7, 7])" in proc.stdout, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: this escnn code computes SO(3) Wigner D-matrices, which need the `lie_learn`")


def test_the_environment_is_byte_compiled_once_at_sync_not_at_every_run():
    """`compile-bytecode` in pyproject.toml made every `uv run` byte-compile the whole environment again (~15k files);
    the README's install step asks for it once, at sync, and CI installs the same way."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert "compile-bytecode" not in tomllib.load(f).get("tool", {}).get("uv", {})
    with open(os.path.join(REPO, "README.md")) as f:
        assert "uv sync --compile-bytecode" in f.read()
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "uv sync --frozen --compile-bytecode" in f.read()
