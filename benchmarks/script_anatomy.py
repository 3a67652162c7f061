"""Anatomy of the training scripts: how many lines are the algorithm, and how many are marked additions to it.

A CleanRL script here marks what it adds to the algorithm: `# PLUMBING` (run management: run name, resume file,
signals, progress, model files, `--eval-checkpoint`) and `# SPEED` (compile, CUDA graphs, bfloat16, memory layout).
The deletion rule, which `strip_marked` applies and tests/test_anatomy.py checks by running the result: a line whose
comment holds either tag goes, with every following line indented deeper than it (its block, its continuation
lines) and, for a dataclass field, the docstring under it. What is left is the eager CleanRL-style script.

Counted per script (non-blank lines): SPEED, PLUMBING, the start-up checks (`check_args`, unmarked) and the rest,
the algorithm a reader reads; the size of the equivariant-vs-plain network diff (every `Equi*` class cut out in
file order against every `CNN*` class, the prefixes renamed alike, as `diff | grep -c '^[<>]'` counts), and the
diff of ppo_atari.py against ppo_atari_equi.py.

    uv run python benchmarks/script_anatomy.py --overwrite                        # the working tree
    uv run python benchmarks/script_anatomy.py --commit 61c02f7 --tag _before     # the scripts at an older commit
"""

import ast
import difflib
import io
import json
import os
import re
import subprocess
import tokenize
from dataclasses import dataclass
from datetime import date
from typing import Optional

from common import REPO, Output, cli, results_path

SCRIPTS = ["ppo_atari.py", "ppo_atari_equi.py", "rpo_mujoco.py", "sac_equi_bullet.py", "dqn_equi_bullet.py",
           "cql_equi_offline.py", "iql_equi_offline.py"]
TAG = re.compile(r"#\s*(SPEED|PLUMBING)\b")
FIELD = re.compile(r"^\s+\w+\s*:\s*[^=]+=")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def tagged_lines(source: str) -> dict[int, str]:
    """Line index (from 0) -> "SPEED" or "PLUMBING", for every line whose comment carries a tag."""
    tags = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and (match := TAG.search(token.string)):
            tags.setdefault(token.start[0] - 1, match.group(1))
    return tags


def marked_blocks(source: str) -> dict[int, str]:
    """Every line index the deletion rule removes -> the tag that removes it."""
    lines, removed = source.splitlines(), {}
    for start, tag in sorted(tagged_lines(source).items()):
        if start in removed:
            continue
        indent, end = indent_of(lines[start]), start + 1
        while end < len(lines):
            nxt = next((j for j in range(end, len(lines)) if lines[j].strip()), len(lines))
            if nxt < len(lines) and indent_of(lines[nxt]) > indent:
                end = nxt + 1
            else:
                break
        if FIELD.match(lines[start]) and end < len(lines) and lines[end].strip().startswith('"""'):
            closing = end if lines[end].strip().count('"""') >= 2 else next(
                j for j in range(end + 1, len(lines)) if '"""' in lines[j])
            end = closing + 1
        for i in range(start, end):
            removed.setdefault(i, tag)
    return removed


def strip_marked(source: str) -> str:
    """The script with every `# SPEED` and `# PLUMBING` addition deleted (the rule above)."""
    removed = marked_blocks(source)
    return "\n".join(line for i, line in enumerate(source.splitlines()) if i not in removed) + "\n"


def anatomy(source: str) -> dict:
    lines = source.splitlines()
    removed = marked_blocks(source)
    checks = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "check_args":
            checks.update(range(node.lineno - 1, node.end_lineno))
    counts = {"SPEED": 0, "PLUMBING": 0, "checks": 0, "algorithm": 0}
    for i, line in enumerate(lines):
        if line.strip():
            counts[removed.get(i) or ("checks" if i in checks else "algorithm")] += 1
    non_blank = sum(counts.values())
    return {"lines": len(lines), "non_blank": non_blank, "speed": counts["SPEED"], "plumbing": counts["PLUMBING"],
            "checks": counts["checks"], "algorithm": counts["algorithm"],
            "algorithm_share": round(counts["algorithm"] / non_blank, 3),
            "speed_share": round(counts["SPEED"] / non_blank, 3),
            "plumbing_share": round(counts["PLUMBING"] / non_blank, 3),
            "checks_share": round(counts["checks"] / non_blank, 3),
            "speed_tags": sum(1 for t in tagged_lines(source).values() if t == "SPEED"),
            "plumbing_tags": sum(1 for t in tagged_lines(source).values() if t == "PLUMBING")}


def changed_lines(a: list[str], b: list[str]) -> int:
    return sum(1 for line in difflib.unified_diff(a, b, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---")))


def network_pair_diff(source: str) -> dict | None:
    """Cut every `Equi*` class and every `CNN*` class out (file order), rename both prefixes to `X`, and diff."""
    tree = ast.parse(source)
    equi, cnn = [], []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.startswith(("Equi", "CNN")):
            text = re.sub(r"\b(Equi|CNN)(?=[A-Z])", "X", ast.get_source_segment(source, node)).splitlines()
            (equi if node.name.startswith("Equi") else cnn).extend(text + [""])
    if not equi or not cnn:
        return None
    return {"equi_lines": len(equi), "cnn_lines": len(cnn), "diff_lines": changed_lines(cnn, equi)}


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
        results["scripts"][script] = {**anatomy(source), "network_pair": network_pair_diff(source)}
    results["ppo_atari_vs_equi_diff_lines"] = changed_lines(sources["ppo_atari.py"].splitlines(),
                                                            sources["ppo_atari_equi.py"].splitlines())
    text = json.dumps(results, indent=1)
    print(text)
    with open(out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main(cli(Args, description=__doc__.split("\n\n")[0]))
