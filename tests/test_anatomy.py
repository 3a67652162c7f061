"""The scripts stay CleanRL scripts: deleting every `# SPEED` and `# PLUMBING` addition (the rule of
benchmarks/script_anatomy.py) leaves a script that still trains eagerly and logs CleanRL's scalars, and the
counts the anatomy benchmark reports add up."""

import glob
import os
import sys

import pytest

from conftest import REPO, read_scalars, run_script

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from script_anatomy import SCRIPTS, anatomy, marked_blocks, network_pair_diff, strip_marked  # noqa: E402


def stripped_copy(script: str, folder) -> str:
    """The script with its additions deleted, written into `folder` (run with the repository on the path)."""
    with open(os.path.join(REPO, script)) as f:
        source = f.read()
    path = os.path.join(folder, f"stripped_{script}")
    with open(path, "w") as f:
        f.write(strip_marked(source))
    return path


def run_stripped(path: str, *flags: str, cwd) -> None:
    proc = run_script(os.path.relpath(path, REPO), *flags, cwd=cwd, env={"PYTHONPATH": REPO})
    assert "Traceback" not in proc.stderr


def test_the_deletion_rule_removes_a_block_its_continuations_and_a_field_docstring():
    source = ('x = 1\nif fast:  # SPEED\n    y = 2\n\n    z = 3\nw = f(a,  # PLUMBING: why\n      b)\n'
              'class A:\n    flag: bool = False  # SPEED\n    """two\n    lines"""\n    other: int = 1\n    """kept"""\n'
              's = "# SPEED in a string is not a tag"\n')
    assert strip_marked(source) == 'x = 1\nclass A:\n    other: int = 1\n    """kept"""\n' \
                                   's = "# SPEED in a string is not a tag"\n'
    assert sorted(set(marked_blocks(source).values())) == ["PLUMBING", "SPEED"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_stripped_script_is_valid_python_and_the_counts_add_up(script, tmp_path):
    with open(os.path.join(REPO, script)) as f:
        source = f.read()
    compile(strip_marked(source), script, "exec")
    counts = anatomy(source)
    assert counts["speed"] + counts["plumbing"] + counts["checks"] + counts["algorithm"] == counts["non_blank"]
    assert counts["algorithm_share"] > 0.6 and counts["speed_tags"] + counts["plumbing_tags"] > 0
    if script not in ("ppo_atari.py", "rpo_mujoco.py"):  # the manipulation and equivariant-PPO scripts hold pairs
        pair = network_pair_diff(source)
        assert script == "ppo_atari_equi.py" or pair["diff_lines"] < pair["equi_lines"] + pair["cnn_lines"]


def test_stripped_ppo_atari_trains_eagerly_and_logs_cleanrls_scalars(tmp_path):
    path = stripped_copy("ppo_atari.py", tmp_path)
    run_stripped(path, "--no-cuda", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
                 "--update-epochs", "1", "--total-timesteps", "128", cwd=tmp_path)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    scalars = read_scalars(run_dir)
    assert {"charts/learning_rate", "losses/value_loss", "losses/policy_loss", "charts/SPS"} <= set(scalars)
    assert not os.path.exists(os.path.join(run_dir, "resume.pt"))  # the plumbing is gone


def test_stripped_sac_trains_eagerly_and_evaluates(tmp_path):
    path = stripped_copy("sac_equi_bullet.py", tmp_path)
    run_stripped(path, "--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8",
                 "--learning-starts", "8", "--num-envs", "2", "--num-demos", "1", "--max-steps", "6",
                 "--total-timesteps", "24", "--eval-frequency", "6", "--eval-episodes", "2", "--num-eval-envs", "2",
                 "--log-frequency", "1", "--no-cuda", cwd=tmp_path)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    scalars = read_scalars(run_dir)
    assert {"losses/qf1_loss", "losses/actor_loss", "eval/success_rate", "charts/SPS"} <= set(scalars)
    assert not os.path.exists(os.path.join(run_dir, "resume.pt"))


MANIPULATION_HYPERPARAMETERS = '''    writer.add_text(
        "hyperparameters",
        "|param|value|\\n|-|-|\\n%s" % ("\\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
'''
PPO_HYPERPARAMETERS = '''    if global_step == 0:  # a new run (a resumed one logged its hyperparameters when it started)
        rows = "\\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\\n|-|-|\\n{rows}")
'''


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_copied_hyperparameter_table_stays_the_same_in_every_script(script):
    """CleanRL writes the hyperparameter table in each script; the copies are deliberate and must not drift."""
    with open(os.path.join(REPO, script)) as f:
        source = f.read()
    expected = PPO_HYPERPARAMETERS if script in ("ppo_atari.py", "ppo_atari_equi.py", "rpo_mujoco.py") \
        else MANIPULATION_HYPERPARAMETERS
    assert source.count(expected) == 1
