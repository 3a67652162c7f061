"""Every place that writes a file, listed, each with what keeps it from replacing something unasked.

The inventory is read from the code itself (every call that writes, renames, removes or records: open(..., "w"),
torch.save, np.savez, savefig, SummaryWriter, RecordVideo, os.replace, shutil.rmtree, ...), in every script, the
package and the benchmarks. A new writing call fails `test_every_file_writing_call_is_listed_with_its_guard` until it
is listed here with its guard and the test that shows the guard working. The guards themselves are exercised with
real files below (or by the named tests elsewhere).
"""

import ast
import glob
import os
import sys
import types

import pytest

from cleanrl_equi.run import keep_earlier_videos, new_folder
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py)

WRITING_CALLS = {"savez", "savez_compressed", "save", "savefig", "SummaryWriter", "RecordVideo", "to_csv",
                 "write_text", "write_bytes", "copyfile", "copy2", "rmtree", "mkstemp", "rename"}
MODULE_QUALIFIED = {"replace": "os", "remove": "os", "unlink": "os", "copy": "shutil"}

RUN_DIRECTORY = ("runs/<run name>: Run refuses a directory that holds another script's run or a run without a resume "
                 "file, and --run-name cannot leave runs/", "tests/test_faults.py::test_run_directories_are_never_shared")
RUN_VIDEOS = ("videos/<run name>[-eval]: the run name is new, and a resumed run first moves the earlier part's videos "
              "aside (keep_earlier_videos)", "tests/test_file_writes.py::test_a_resumed_run_keeps_its_earlier_videos")
EVAL_VIDEOS = ("evaluation videos: a new folder each time (new_folder)",
               "tests/test_faults.py::test_two_video_evaluations_keep_both_folders_with_one_video_per_episode")
ATOMIC_IN_RUN = ("a model or resume file in the run's own directory, written to a temporary file and renamed into "
                 "place (a full disk leaves no partial file)",
                 "tests/test_faults.py::test_full_disk_at_save_model_stops_with_one_sentence_and_leaves_no_partial_file")
DATASET = ("datasets: make_dataset refuses an existing --out without --overwrite; the cached default dataset is "
           "written once, atomically", "tests/test_offline_data.py::test_an_existing_file_is_never_replaced_unasked")
PLOTS = ("plots and summaries: refused if they exist, unless --overwrite",
         "tests/test_plot_runs.py::test_nothing_is_overwritten_without_the_flag")
RESULTS = ("benchmark results: results_path refuses existing results (default path or --out) unless --overwrite; "
           "other writes of a benchmark go to its own temporary folders",
           "tests/test_file_writes.py::test_benchmark_results_are_never_replaced_unasked")

# (file, enclosing function) -> guard. Benchmarks are covered as a whole by RESULTS (each one must call results_path).
INVENTORY = {
    **{(script, "<module>"): RUN_DIRECTORY for script in (
        "ppo_atari.py", "ppo_atari_equi.py", "rpo_mujoco.py", "sac_equi_bullet.py", "dqn_equi_bullet.py",
        "cql_equi_offline.py", "iql_equi_offline.py")},
    ("rpo_mujoco.py", "make_env.thunk"): RUN_VIDEOS,
    ("cleanrl_equi/envs/atari.py", "make_gym_env.thunk"): RUN_VIDEOS,
    ("cleanrl_equi/run.py", "keep_earlier_videos"): RUN_VIDEOS,
    ("cleanrl_equi/envs/manipulation/rollouts.py", "make_envs.thunk.make"): EVAL_VIDEOS,
    ("cleanrl_equi/checkpoints.py", "save_checkpoint"): ATOMIC_IN_RUN,
    ("cleanrl_equi/run.py", "Run._claim_directory"): RUN_DIRECTORY,
    ("cleanrl_equi/datasets.py", "save_dataset"): DATASET,
    ("cleanrl_equi/tools/plot_runs.py", "main"): PLOTS,
}


def writing_calls(path: str) -> set[tuple[str, str]]:
    """(file, dotted enclosing function) of every call in `path` that writes, moves or removes a file."""
    found: set[tuple[str, str]] = set()
    relative = os.path.relpath(path, REPO)

    def visit(node, scope: list[str]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        if isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            owner = getattr(function.value, "id", None) if isinstance(function, ast.Attribute) else None
            writes = name in WRITING_CALLS or (name in MODULE_QUALIFIED and owner == MODULE_QUALIFIED[name])
            if name == "open":
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
            if writes:
                found.add((relative, ".".join(scope) or "<module>"))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    with open(path) as f:
        visit(ast.parse(f.read()), [])
    return found


def project_files(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(REPO, pattern), recursive=True))


def test_every_file_writing_call_is_listed_with_its_guard():
    found = set()
    for path in project_files("*.py") + project_files("cleanrl_equi/**/*.py"):
        found |= writing_calls(path)
    unlisted = sorted(found - set(INVENTORY))
    assert not unlisted, f"file-writing calls without a listed guard (add them to INVENTORY): {unlisted}"
    gone = sorted(set(INVENTORY) - found)
    assert not gone, f"listed writers that no longer write (remove them from INVENTORY): {gone}"


def test_every_benchmark_that_writes_asks_results_path_first():
    for path in project_files("benchmarks/*.py"):
        if writing_calls(path) and not path.endswith("common.py"):
            with open(path) as f:
                assert "results_path(" in f.read(), f"{path} writes files without results_path"


def test_every_guard_names_a_test_that_exists():
    for _, test in set(INVENTORY.values()) | {RESULTS}:
        file, name = test.split("::")
        with open(os.path.join(REPO, file)) as f:
            assert f"def {name}(" in f.read(), test


def test_benchmark_results_are_never_replaced_unasked(tmp_path, capsys):
    """A real second write attempt, at --out and with companions: refused (one sentence) until --overwrite."""
    out = tmp_path / "speed.json"
    args = types.SimpleNamespace(out=str(out), tag="", overwrite=False)
    assert common.results_path(args, "speed.json", companions=(".csv",)) == str(out)
    out.with_suffix(".csv").write_text("step,sps\n")
    with pytest.raises(SystemExit) as stopped:
        common.results_path(args, "speed.json", companions=(".csv",))
    assert stopped.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert out.with_suffix(".csv").read_text() == "step,sps\n"
    args.overwrite = True
    assert common.results_path(args, "speed.json", companions=(".csv",)) == str(out)
    folder = types.SimpleNamespace(out=str(tmp_path / "curves"), tag="", overwrite=False)
    common.results_path(folder, "curves", folder=True)  # an empty folder holds nothing to lose
    (tmp_path / "curves" / "a.png").write_bytes(b"png")
    with pytest.raises(SystemExit):
        common.results_path(folder, "curves", folder=True)


def test_a_resumed_run_keeps_its_earlier_videos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("videos/r", "videos/r-eval"):
        os.makedirs(folder)
        with open(f"{folder}/rl-video-episode-0.mp4", "wb") as f:
            f.write(folder.encode())
    os.makedirs("videos/r-before-step-64")  # an earlier resume at the same step: never replaced either
    keep_earlier_videos("r", 64)
    assert not os.path.exists("videos/r") and not os.path.exists("videos/r-eval")
    with open("videos/r-before-step-64-2/rl-video-episode-0.mp4", "rb") as f:
        assert f.read() == b"videos/r"
    with open("videos/r-eval-before-step-64/rl-video-episode-0.mp4", "rb") as f:
        assert f.read() == b"videos/r-eval"
    assert new_folder("videos/r-eval-before-step-64") == "videos/r-eval-before-step-64-2"
    keep_earlier_videos("never-recorded", 0)  # nothing to move: nothing happens
