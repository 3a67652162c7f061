"""Anatomy of the training scripts: non-blank lines, and how many of them are run plumbing rather than the algorithm.

Plumbing, as the structure issue counts it: the Args fields of run management (run name, resume clock, progress,
wandb, video, model saving, checkpoint evaluation) with their docstrings, the start-up validation (`check_args`),
the `--eval-checkpoint` loaders, and every line of the main block that talks to `Run` or handles
`--eval-checkpoint`. Everything else (imports, header docstring, the rest of Args, env setup, networks, losses, the
loop and its logging) counts as the algorithm file a reader reads. Also: diff sizes of the equivariant vs plain
network code where one file holds both.

    uv run python benchmarks/script_anatomy.py --overwrite                     # benchmarks/results/script_anatomy.json
    uv run python benchmarks/script_anatomy.py --commit b5f5ce1 --tag _before  # the scripts at an older commit
"""

import ast
import difflib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import date
from typing import Optional

from common import REPO, Output, cli, results_path
SCRIPTS = ["ppo_atari.py", "ppo_atari_equi.py", "rpo_mujoco.py", "sac_equi_bullet.py", "cql_equi_offline.py",
           "iql_equi_offline.py", "dqn_equi_bullet.py"]
PLUMBING_FIELDS = {"track", "wandb_project_name", "wandb_entity", "capture_video", "save_model", "eval_checkpoint",
                   "run_name", "checkpoint_minutes", "progress_interval"}
PLUMBING_FUNCTIONS = {"check_args", "load_actor", "load_policy", "run_evaluation"}
PLUMBING_WORDS = ("run.", "Run(", "PLUMBING", "eval_checkpoint", "device_for(", "resume", "wandb", "SummaryWriter(",
                  "make_run_name", "StopSignal", "CheckpointClock", "clock.", "stop.", "stop_for_requeue",
                  "save_checkpoint", "last_progress", "progress_interval", "set_rng_state", "run_dir", "run_name",
                  "min left", "hyperparameters", "RESUME_FILE", "load_state(")


def mark_statements(statements, source: str, plumbing: set[int]) -> None:
    """Mark a statement (all its lines) as plumbing when it mentions a plumbing word; a compound statement whose
    header does is marked whole, otherwise its body is looked at statement by statement."""
    for node in statements:
        body = [getattr(node, name) for name in ("body", "orelse", "finalbody") if getattr(node, name, None)]
        if body and not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            header = ast.get_source_segment(source, node).split("\n")[0]
            if any(word in header for word in PLUMBING_WORDS):
                plumbing.update(range(node.lineno, node.end_lineno + 1))
            else:
                for block in body:
                    mark_statements(block, source, plumbing)
        elif any(word in ast.get_source_segment(source, node) for word in PLUMBING_WORDS):
            plumbing.update(range(node.lineno, node.end_lineno + 1))


def anatomy(source: str) -> dict:
    lines = source.splitlines()
    plumbing: set[int] = set()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            body = node.body
            for i, item in enumerate(body):
                if isinstance(item, ast.AnnAssign) and item.target.id in PLUMBING_FIELDS:
                    end = body[i + 1].end_lineno if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) \
                        else item.end_lineno
                    plumbing.update(range(item.lineno, end + 1))
        elif isinstance(node, ast.FunctionDef) and node.name in PLUMBING_FUNCTIONS:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            plumbing.update(range(start, node.end_lineno + 1))
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            mark_statements(node.body, source, plumbing)
    non_blank = [n for n, line in enumerate(lines, 1) if line.strip()]
    plumbing_lines = [n for n in non_blank if n in plumbing]
    return {"lines": len(lines), "non_blank": len(non_blank), "plumbing": len(plumbing_lines),
            "plumbing_share": round(len(plumbing_lines) / len(non_blank), 3),
            "algorithm_share": round(1 - len(plumbing_lines) / len(non_blank), 3)}


def network_diff(source: str) -> dict | None:
    """Lines that differ between the equivariant and the plain versions of each network in one file."""
    tree = ast.parse(source)
    classes = {node.name: ast.get_source_segment(source, node) for node in tree.body if isinstance(node, ast.ClassDef)}
    pairs = [(name, "CNN" + name[len("Equi"):]) for name in classes if name.startswith("Equi")]
    pairs = [(a, b) for a, b in pairs if b in classes]
    if not pairs:
        return None
    out = {}
    for equi, cnn in pairs:
        diff = difflib.unified_diff(classes[cnn].splitlines(), classes[equi].splitlines(), lineterm="", n=0)
        changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        out[f"{equi} vs {cnn}"] = {"equi_lines": len(classes[equi].splitlines()),
                                   "cnn_lines": len(classes[cnn].splitlines()), "diff_lines": len(changed)}
    return out


@dataclass
class Args(Output):
    repo: str = REPO
    """checkout to measure"""
    commit: Optional[str] = None
    """measure the scripts as they are at this git commit of --repo (default: the working tree)"""


def main(opts: Args) -> None:
    out = results_path(opts, "script_anatomy.json")
    sources: dict[str, str] = {}
    results = {"date": str(date.today()), "commit": opts.commit or "working tree", "scripts": {}}
    for script in SCRIPTS:
        if opts.commit:
            shown = subprocess.run(["git", "-C", opts.repo, "show", f"{opts.commit}:{script}"], capture_output=True,
                                   text=True)
            if shown.returncode != 0:  # the script did not exist yet at that commit
                continue
            source = shown.stdout
        else:
            with open(os.path.join(opts.repo, script)) as f:
                source = f.read()
        sources[script] = source
        results["scripts"][script] = {**anatomy(source), "networks": network_diff(source),
                                      "R2Conv_lines": source.count("R2Conv(")}
    plain, equi = sources["ppo_atari.py"].splitlines(), sources["ppo_atari_equi.py"].splitlines()
    results["ppo_atari_vs_equi_diff_lines"] = sum(  # as `diff ppo_atari.py ppo_atari_equi.py | grep -c '^[<>]'`
        1 for line in difflib.unified_diff(plain, equi, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---")))
    text = json.dumps(results, indent=1)
    print(text)
    with open(out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main(cli(Args, description=__doc__.split("\n\n")[0]))
