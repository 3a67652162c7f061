"""The documentation works as written: every command in README.md and docs/*.md that runs a script of this repository
parses with that script's own command line, and every relative link points to a file that exists.

Only parsing is checked (nothing is trained): a training script is imported as a module (it trains only under
`__main__`) and its `Args` read with tyro, as the script does; a tool of `cleanrl_equi.tools` likewise; a benchmark
through `benchmarks/common.py`'s `cli`, and the flags it passes on after `--` by the training script it starts.
Placeholders such as `<run>` are filled with a dummy word first, since only the flags and their values are read.
"""

import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Annotated, Union

from conftest import REPO

PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
PLACEHOLDER = "placeholder"
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
# benchmarks that start training runs, and the scripts that receive the flags given after `--`
PASSED_ON_TO = {
    "sac_learning": ["sac_equi_bullet"],
    "smooth_gentle_study": ["sac_equi_bullet"],
    "dqn_learning": ["dqn_equi_bullet"],
    "offline_learning": ["cql_equi_offline", "iql_equi_offline"],
    "atari_sps": ["ppo_atari", "ppo_atari_equi"],
    "rpo_mujoco_learning": ["rpo_mujoco"],
}


@dataclass
class Command:
    page: str
    line: int
    text: str

    def where(self) -> str:
        return f"{os.path.relpath(self.page, REPO)}:{self.line}: {self.text}"


# ---- Finding the commands -------------------------------------------------------------------------------------------
def fenced_lines(page: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced code block; a line ending in a backslash continues on the next."""
    lines, inside, pending, start = [], False, "", 0
    with open(page, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            stripped = line.rstrip("\n")
            if stripped.lstrip().startswith("```"):
                inside, pending = not inside, ""
                continue
            if not inside:
                continue
            if not pending:
                start = number
            if stripped.rstrip().endswith("\\"):
                pending += stripped.rstrip()[:-1] + " "
                continue
            lines.append((start, pending + stripped))
            pending = ""
    return lines


def inline_commands(page: str) -> list[tuple[int, str]]:
    """Commands written as inline code outside the fences (e.g. in a table): `uv run python ...`, `sbatch ...`."""
    found, inside = [], False
    with open(page, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                inside = not inside
                continue
            if inside:
                continue
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"(\w+=\S+\s+)*(uv run (--frozen )?python|sbatch) ", span):
                    found.append((number, span))
    return found


def commands() -> list[Command]:
    found = []
    for page in PAGES:
        for number, text in fenced_lines(page) + inline_commands(page):
            if runs_a_repository_file(text):
                found.append(Command(page, number, text.strip()))
    return found


def runs_a_repository_file(text: str) -> bool:
    return bool(re.search(r"\bpython (-m cleanrl_equi\.tools\.|\S+\.py\b)|\bsbatch\b.*\bslurm/\S+\.sbatch", text))


def tokens_of(text: str) -> list[list[str]]:
    """The shell words of a line (placeholders filled, the comment dropped), split into its commands."""
    filled = re.sub(r"<[^<>\n]*>", PLACEHOLDER, text)
    lexer = shlex.shlex(filled, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, parts = list(lexer), [[]]
    for word in words:
        if word in SHELL_SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


# ---- Parsing them ---------------------------------------------------------------------------------------------------
_modules: dict[str, object] = {}


def module_of(key: str):
    """A training script ("ppo_atari"), a benchmark ("benchmarks/sac_learning") or a tool
    ("cleanrl_equi.tools.plot_runs") as a module, loaded once, its main not run."""
    if key not in _modules:
        if key.startswith("cleanrl_equi."):
            _modules[key] = importlib.import_module(key)
        else:
            if key.startswith("benchmarks/") and os.path.join(REPO, "benchmarks") not in sys.path:
                sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # as `python benchmarks/x.py` would have it
            name = "docs_" + key.replace("/", "_")
            spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"{key}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up there (postponed annotations)
            spec.loader.exec_module(module)
            _modules[key] = module
    return _modules[key]


def parse(parser, argv: list[str]) -> str:
    """Run `parser(argv)`; '' if it parsed (or printed --help), else what it printed on the way out."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            parser(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            lines = [line.strip(" │|─-╭╮╰╯") for line in printed.getvalue().splitlines()]
            return " / ".join(line for line in lines if line and "helptext" not in line) or f"exit {stop.code}"
    return ""


def script_parser(script: str):
    import tyro

    module = module_of(script)
    return lambda argv: tyro.cli(module.Args, args=argv)


def benchmark_parser(name: str):
    """`benchmarks/<name>.py`'s own command line: its `Args` (or its subcommands) through common.cli."""
    module = module_of(f"benchmarks/{name}")
    with open(os.path.join(REPO, "benchmarks", f"{name}.py"), encoding="utf-8") as f:
        passthrough = "passthrough=True" in f.read()
    if hasattr(module, "Args"):
        args_type = module.Args
    else:  # rpo_mujoco_learning: `run` and `collect`, built under its __main__
        import tyro

        args_type = Union[Annotated[module.RunArgs, tyro.conf.subcommand("run")],
                          Annotated[module.CollectArgs, tyro.conf.subcommand("collect")]]
    common = importlib.import_module("common")  # the module the benchmark imported (its Launch, its checks)
    return lambda argv: common.cli(args_type, argv=argv, passthrough=passthrough)


def check_python(words: list[str]) -> list[str]:
    """Errors of one `python ...` command (its words after `python`)."""
    if words[0] == "-m":
        tool = words[1]
        if not tool.startswith("cleanrl_equi.tools."):
            return []
        import tyro

        module = module_of(tool)
        return [error for error in [parse(lambda argv: tyro.cli(module.Args, args=argv), words[2:])] if error]
    path, argv = words[0], words[1:]
    if not os.path.isfile(os.path.join(REPO, path)):
        return [f"{path} is not a file of the repository"]
    if path.startswith("benchmarks/") and path.endswith(".py"):
        name = path[len("benchmarks/"):-len(".py")]
        errors = [parse(benchmark_parser(name), argv)]
        if "--" in argv:
            for script in PASSED_ON_TO.get(name, []):
                errors.append(parse(script_parser(script), argv[argv.index("--") + 1:]))
        return [error for error in errors if error]
    if "/" not in path and path.endswith(".py"):
        return [error for error in [parse(script_parser(path[:-3]), argv)] if error]
    return []


def check_sbatch(assignments: dict[str, str], words: list[str]) -> list[str]:
    """`sbatch [options] slurm/<template> <flags>`: the template exists and the flags parse by the script it runs
    (slurm/array.sbatch: SCRIPT, or a variant's own script, with the common flags then each VARIANT's)."""
    position = next(i for i, word in enumerate(words) if word.startswith("slurm/"))
    template, flags = words[position], words[position + 1:]
    if not os.path.isfile(os.path.join(REPO, template)):
        return [f"{template} is not a file of the repository"]
    name = os.path.basename(template)[: -len(".sbatch")]
    if name != "array":
        return [error for error in [parse(script_parser(name), flags)] if error]
    errors = []
    tasks = len(assignments.get("SEEDS", "1").split()) * len(assignments.get("VARIANTS", "").split(";"))
    array = next((re.fullmatch(r"--array=0-(\d+)(%\d+)?", word) for word in words
                  if word.startswith("--array=")), None)
    if array is None or int(array.group(1)) != tasks - 1:
        errors.append(f"seeds x variants need --array=0-{tasks - 1}")
    for variant in assignments.get("VARIANTS", "").split(";"):
        variant_words = variant.split()
        script = assignments.get("SCRIPT", "")
        if variant_words and variant_words[0].endswith(".py"):
            script, variant_words = variant_words[0], variant_words[1:]
        if not script.endswith(".py") or not os.path.isfile(os.path.join(REPO, script)):
            errors.append(f"array variant {variant!r} names no training script of the repository")
            continue
        errors.append(parse(script_parser(script[:-3]), [*flags, "--seed", "1", *variant_words]))
    return [error for error in errors if error]


def check(command: Command) -> list[str]:
    errors = []
    for words in tokens_of(command.text):
        assignments = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # OMP_NUM_THREADS=1 and the like
            key, value = words.pop(0).split("=", 1)
            assignments[key] = value
        if words[:3] == ["uv", "run", "--frozen"]:
            words = words[3:]
        elif words[:2] == ["uv", "run"]:
            words = words[2:]
        if words and words[0] == "python" and len(words) > 1:
            errors += check_python(words[1:])
        elif words and words[0] == "sbatch" and any(word.startswith("slurm/") for word in words):
            errors += check_sbatch(assignments, words)
    return errors


ALL_COMMANDS = commands()


def test_the_docs_hold_the_commands_of_every_script():
    """A page per script, a command per script in the README: the extraction finds them (and so checks them)."""
    pages = {os.path.relpath(command.page, REPO) for command in ALL_COMMANDS}
    assert "README.md" in pages, pages
    readme = " ".join(command.text for command in ALL_COMMANDS if command.page.endswith("README.md"))
    for script in ("ppo_atari.py", "ppo_atari_equi.py", "rpo_mujoco.py", "sac_equi_bullet.py", "dqn_equi_bullet.py",
                   "cql_equi_offline.py", "iql_equi_offline.py"):
        assert f"python {script}" in readme, f"README.md runs no `{script}` command"
    assert len(ALL_COMMANDS) >= 40, len(ALL_COMMANDS)


def test_every_command_parses():
    failures = []
    for command in ALL_COMMANDS:
        try:
            errors = check(command)
        except Exception as error:  # a script that cannot be imported, a word the shell cannot split
            errors = [f"{type(error).__name__}: {error}"]
        failures += [f"{command.where()}\n    {error}" for error in errors]
    assert not failures, "commands in the docs that do not parse:\n" + "\n".join(failures)


def test_the_readme_keeps_the_install_and_test_commands():
    """CI (.ci/run) installs and tests as the README says."""
    readme = open(PAGES[0], encoding="utf-8").read()
    for line in ("pip install uv", "uv sync", "uv run pytest", "pip install --no-deps -r requirements.txt"):
        assert re.search(rf"^{re.escape(line)}\b", readme, flags=re.MULTILINE), f"README.md lost `{line}`"
    assert re.search(r"^## Tests$", readme, flags=re.MULTILINE)


# ---- Links ----------------------------------------------------------------------------------------------------------
def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(page: str) -> set[str]:
    with open(page, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.DOTALL)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_every_relative_link_points_to_a_file():
    broken = []
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            lines = f.read().split("\n")
        inside = False
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                inside = not inside
            if inside:
                continue
            for target in re.findall(r"\]\(([^()\s]+)\)", line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, fragment = target.partition("#")
                resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                where = f"{os.path.relpath(page, REPO)}:{number}: {target}"
                if not os.path.exists(resolved):
                    broken.append(f"{where} (no such file)")
                elif fragment and resolved.endswith(".md") and fragment not in anchors_of(resolved):
                    broken.append(f"{where} (no such heading)")
                elif os.path.relpath(resolved, REPO).startswith(".."):
                    broken.append(f"{where} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_file_named_in_the_docs_exists():
    """Paths of the repository written as inline code (`benchmarks/results/x.json`, `tests/test_y.py`, a folder with
    its trailing slash) exist; braces name several files (`x.{csv,json}`)."""
    missing = []
    pattern = re.compile(r"`((?:benchmarks|tests|cleanrl_equi|slurm|docs)/[\w./{},*-]+)`")
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                for path in pattern.findall(line):
                    if not (path.endswith("/") or "." in path.rsplit("/", 1)[-1]):
                        continue  # an env id such as cleanrl_equi/BlockPulling-v0, not a file
                    for expanded in expand_braces(path):
                        if not glob.glob(os.path.join(REPO, expanded.rstrip("/"))):
                            missing.append(f"{os.path.relpath(page, REPO)}:{number}: {expanded}")
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)


def expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [expanded for choice in match.group(1).split(",")
            for expanded in expand_braces(path[:match.start()] + choice + path[match.end():])]

