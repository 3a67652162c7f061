"""The install story: requirements.txt is the lock's full closure, and escnn comes from PyPI unpatched."""

import os
import re
import tomllib

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
    assert "py3nj" not in names and "escnn" in names
    assert escnn.__file__.startswith(os.path.join(REPO, ".venv")) or "site-packages" in escnn.__file__
    assert not os.path.exists(os.path.join(REPO, "escnn"))
