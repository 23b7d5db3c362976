"""The commands and links that README.md and docs/*.md print are real.

The convention (also described in docs/development.md, "Commands in the docs are tested"):

* **Runnable blocks.** A fenced code block whose info string is ``bash runnable``, i.e. opened
  with three backticks followed by ``bash runnable``, holds only ``fedmri`` commands (and
  comments) that are cheap and self-contained. Each of its logical lines (``\\`` continues a
  line) is run with the installed ``fedmri`` console script, through ``bash -c``, in a fresh
  temporary folder per block with its own ``$FEDMRI_HOME``; the exit code must be 0. Lines of
  one block run in order in the same folder, so a later line may use what an earlier one made.
* **Every other ``fedmri`` command**, in any shell block (info string ``bash``, ``sh``,
  ``shell``, ``console`` or none) or in inline code, is checked statically: its subcommand path
  must exist (``fedmri <path> --help`` exits 0), and every ``--option`` it uses must appear in
  that command's ``--help``. The ``--help`` calls run in one subprocess that loads the
  console script's entry point (as pyproject.toml names it) and calls it once per path.
  Blocks in other languages (python, yaml, json, text) hold no commands.
* **Links.** Every relative Markdown link must point to an existing file, and a ``#fragment``
  into a Markdown page must be the GitHub anchor of one of its headings.

No internals of the CLI are imported: only the installed console script and its entry point.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_INFO = "bash runnable"
MAX_README_LINES = 250

_FENCE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_SEPARATORS = {"&&", "||", ";", "|", "&"}
_REDIRECTS = {">", ">>", "<", "<<", ">&", "<&", ">|"}
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_OPTION = re.compile(r"^(--?[A-Za-z][\w-]*)(=.*)?$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


# ---- Markdown --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it opens, its info string and its lines (indent removed)."""

    where: str
    info: str
    lines: tuple[str, ...]

    @property
    def runnable(self) -> bool:
        return self.info.split() == RUNNABLE_INFO.split()


@dataclass(frozen=True)
class Page:
    blocks: tuple[Block, ...]
    prose: tuple[str, ...]  # the lines outside fenced blocks


def parse_markdown(text: str, name: str = "<text>") -> Page:
    """Split Markdown into fenced blocks (CommonMark rules for fences) and the prose around them."""
    blocks: list[Block] = []
    prose: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        if match is None or (match["fence"][0] == "`" and "`" in match["info"]):
            prose.append(lines[i])
            i += 1
            continue
        indent, fence, start = len(match["indent"]), match["fence"], i
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            line = lines[i]
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[strip:])
            i += 1
        i += 1  # the closing fence (or the end of the file, which closes an unclosed block)
        blocks.append(Block(f"{name}:{start + 1}", match["info"].strip(), tuple(body)))
        prose.append("")
    return Page(tuple(blocks), tuple(prose))


def logical_lines(lines: tuple[str, ...] | list[str]) -> list[str]:
    """Join lines that end with a backslash; drop blank lines."""
    out: list[str] = []
    pending: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        out.append(" ".join([*pending, line]).strip())
        pending = []
    if pending:
        out.append(" ".join(pending))
    return [line for line in out if line]


def tokens(line: str) -> list[str]:
    """Shell words of one line, with comments dropped and operators as their own tokens."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose: fall back to plain words
        return line.split()


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a line: split at ;, &&, ||, |, &, each cut at its first redirect."""
    commands: list[list[str]] = [[]]
    cut = False
    for token in tokens(line):
        if token in _SEPARATORS:
            commands.append([])
            cut = False
        elif token in _REDIRECTS or cut:
            cut = True
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def is_fedmri(command: list[str]) -> bool:
    return Path(command[0]).name == "fedmri"


@dataclass(frozen=True)
class Command:
    """A fedmri command as printed: its subcommand path and the options it uses."""

    where: str
    text: str
    path: tuple[str, ...]
    options: tuple[str, ...]


def as_command(words: list[str], where: str) -> Command:
    path: list[str] = []
    rest = words[1:]
    while rest and _NAME.match(rest[0]):
        path.append(rest.pop(0))
    options = []
    for word in rest:
        match = _OPTION.match(word.strip("[]"))
        if match:
            options.append(match[1])
    return Command(where, " ".join(words), tuple(path), tuple(options))


def inline_code(prose: tuple[str, ...]) -> list[str]:
    """Inline code spans, paragraph by paragraph (a span may wrap across lines)."""
    spans: list[str] = []
    for paragraph in "\n".join(prose).split("\n\n"):
        spans += re.findall(r"(?<!`)`([^`]+)`(?!`)", " ".join(paragraph.split("\n")))
    return spans


def commands_of(page: Page, name: str) -> list[Command]:
    """Every fedmri command a page prints: in shell blocks (bash, sh, console, no info), and in inline code."""
    found: list[Command] = []
    for block in page.blocks:
        if block.info.split()[:1] not in ([], ["bash"], ["sh"], ["shell"], ["console"]):
            continue  # python, yaml, json, text (a log message): not commands
        for line in logical_lines(block.lines):
            found += [as_command(c, block.where) for c in simple_commands(line) if is_fedmri(c)]
    for span in inline_code(page.prose):
        if span.split()[:1] == ["fedmri"]:
            found += [as_command(c, f"{name} (inline)") for c in simple_commands(span) if is_fedmri(c)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: text only, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in page.prose:
        match = _HEADING.match(line)
        if match:
            base = slug(match[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Page) -> list[str]:
    targets: list[str] = []
    for paragraph in "\n".join(page.prose).split("\n\n"):
        text = re.sub(r"(?<!`)`[^`]+`(?!`)", "", " ".join(paragraph.split("\n")))
        targets += _LINK.findall(text)
    return targets


@functools.cache
def parsed(path: Path) -> Page:
    return parse_markdown(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))


def all_blocks() -> list[Block]:
    return [block for path in PAGES for block in parsed(path).blocks]


def all_commands() -> list[Command]:
    return [command for path in PAGES for command in commands_of(parsed(path), str(path.relative_to(ROOT)))]


# ---- Running fedmri ---------------------------------------------------------------------------


def fedmri_script() -> str:
    """The installed console script: the one beside this interpreter first, then PATH."""
    found = shutil.which("fedmri", path=str(Path(sys.executable).parent)) or shutil.which("fedmri")
    assert found, "the fedmri console script is not installed (pip install -e .)"
    return found


def environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(fedmri_script()).parent) + os.pathsep + env.get("PATH", "")
    env["FEDMRI_HOME"] = str(home)
    env["COLUMNS"] = "200"  # typer's help is not wrapped or cut
    env["TERM"] = "dumb"
    env["NO_COLOR"] = "1"
    return env


# Every `--help` in one process: the console script's own entry point (as pyproject.toml names it),
# called once per path. One process instead of one per path: each start costs seconds on 2 cores.
_HELP_SCRIPT = """
import contextlib, io, json, sys
from importlib.metadata import entry_points
(script,) = [e for e in entry_points(group="console_scripts") if e.name == "fedmri"]
main = script.load()
out = []
for path in json.loads(sys.stdin.read()):
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    sys.argv = ["fedmri", *path, "--help"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    out.append([path, code, stdout.getvalue(), stderr.getvalue()])
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Help:
    code: int
    stdout: str
    stderr: str


def helps(paths: list[tuple[str, ...]], scratch: Path) -> dict[tuple[str, ...], Help]:
    """`fedmri <path> --help` for every path: its exit code and output."""
    python = Path(fedmri_script()).parent / Path(sys.executable).name
    result = subprocess.run(
        [str(python) if python.exists() else sys.executable, "-c", _HELP_SCRIPT],
        input=json.dumps([list(path) for path in paths]),
        cwd=scratch,
        env=environment(scratch / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {tuple(path): Help(code, out, err) for path, code, out, err in json.loads(result.stdout)}


def static_problems(commands: list[Command], known: dict[tuple[str, ...], Help]) -> list[str]:
    """What is wrong with these commands as printed: a subcommand path or an option that does not exist."""
    problems = []
    for command in commands:
        shown = " ".join(("fedmri", *command.path))
        found = known[command.path]
        if found.code != 0:
            problems.append(
                f"{command.where}: `{command.text}`: `{shown} --help` exited {found.code}: {found.stderr[-300:]}"
            )
            continue
        for option in command.options:
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", found.stdout):
                problems.append(f"{command.where}: `{command.text}`: {option} is not an option of `{shown}`")
    return problems


RUNNABLE = [block for block in all_blocks() if block.runnable]
BY_PATH: dict[tuple[str, ...], list[Command]] = {}
for _command in all_commands():
    BY_PATH.setdefault(_command.path, []).append(_command)

SELF_CHECK = {
    "wrong path": "fedmri sites no-such-command --out x",
    "wrong option": "fedmri sites make --scenario tiny --no-such-option 3",
    "right": "fedmri sites make --scenario tiny --no-public --out x",
}


@pytest.fixture(scope="module")
def all_helps(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Help]:
    extra = [as_command(tokens(text), "self-check").path for text in SELF_CHECK.values()]
    return helps(sorted({*BY_PATH, *extra}), tmp_path_factory.mktemp("docs-help"))


# ---- Tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_runnable_block_runs(block: Block, tmp_path: Path) -> None:
    lines = logical_lines(block.lines)
    commands = [line for line in lines if not line.startswith("#")]
    assert commands, f"{block.where}: a runnable block with no command"
    env = environment(tmp_path / "home")
    for line in commands:
        for command in simple_commands(line):
            assert is_fedmri(command), f"{block.where}: a runnable block holds only fedmri commands, not `{line}`"
        result = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (
            f"{block.where}: `{line}` exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


@pytest.mark.parametrize("path", sorted(BY_PATH), ids=lambda path: " ".join(("fedmri", *path)))
def test_printed_command_exists(path: tuple[str, ...], all_helps: dict[tuple[str, ...], Help]) -> None:
    problems = static_problems(BY_PATH[path], all_helps)
    assert not problems, "\n".join(problems)


def test_enough_commands_are_runnable() -> None:
    """The test above must have something to run: several blocks, on more than one page."""
    runnable_lines = [line for block in RUNNABLE for line in logical_lines(block.lines) if not line.startswith("#")]
    assert len(RUNNABLE) >= 4, [block.where for block in RUNNABLE]
    assert len(runnable_lines) >= 6, runnable_lines
    assert len({block.where.split(":")[0] for block in RUNNABLE}) >= 2
    assert len(BY_PATH) >= 10, sorted(BY_PATH)


def test_a_wrong_command_is_caught(tmp_path: Path, all_helps: dict[tuple[str, ...], Help]) -> None:
    """The checks can fail: the installed script rejects a bogus command; a bogus path or option is reported."""
    bogus = subprocess.run(
        [fedmri_script(), "no-such-command", "--help"],
        cwd=tmp_path,
        env=environment(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bogus.returncode != 0
    check = {name: static_problems([as_command(tokens(text), name)], all_helps) for name, text in SELF_CHECK.items()}
    assert len(check["wrong path"]) == 1 and "exited" in check["wrong path"][0]
    assert len(check["wrong option"]) == 1 and "--no-such-option" in check["wrong option"][0]
    assert check["right"] == []


def test_markdown_extraction() -> None:
    """Continuations, indented and nested fences, inline spans that wrap, comments and redirects."""
    text = "\n".join(
        [
            "Run `fedmri sites",
            "summary SITE.yaml --json` first.",
            "",
            "1. Step:",
            "",
            "   ```bash runnable",
            "   fedmri sites make --scenario tiny \\",
            "       --out tiny   # a comment --not-an-option",
            "   ```",
            "",
            "````markdown",
            "```bash runnable",
            "fedmri inside --a-nested-fence",
            "```",
            "````",
            "",
            "```bash",
            "fedmri bench --quick > bench.json && fedmri verify R --keys K",
            "python3 -m venv .venv",
            "```",
            "See [a page](docs/x.md#a-b) and `[not a link](y.md)`.",
            "## A heading: with `code`, (ε ≤ 8)",
        ]
    )
    page = parse_markdown(text, "t.md")
    assert [block.info for block in page.blocks] == ["bash runnable", "markdown", "bash"]
    assert [block.runnable for block in page.blocks] == [True, False, False]
    assert page.blocks[1].lines == ("```bash runnable", "fedmri inside --a-nested-fence", "```")  # not scanned
    assert logical_lines(page.blocks[0].lines) == [
        "fedmri sites make --scenario tiny --out tiny   # a comment --not-an-option"
    ]
    found = [(c.path, c.options) for c in commands_of(page, "t.md")]
    assert found == [
        (("sites", "make"), ("--scenario", "--out")),
        (("bench",), ("--quick",)),
        (("verify",), ("--keys",)),
        (("sites", "summary"), ("--json",)),
    ]
    assert links(page) == ["docs/x.md#a-b"]
    assert anchors(page) == {"a-heading-with-code-ε--8"}


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = []
    for target in links(parsed(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            problems.append(f"{target}: no file {resolved}")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(parsed(resolved)):
            problems.append(f"{target}: no heading with anchor #{fragment} in {resolved.name}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)
