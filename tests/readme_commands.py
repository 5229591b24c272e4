"""The shell commands of README.md and docs/*.md, and the rule that decides how each one is tested.

Pure functions over markdown text: `fenced_blocks` finds the fenced code blocks, `split_commands` turns a
shell block into commands (backslash continuations joined, `&&` and `;` chains split, `#` comments dropped,
`$ ` prompts of console blocks stripped, console output lines ignored), `placeholder_outputs` follows the
placeholder paths through the commands that read and write them, and `classify` lists the rules that claim a
command (the test requires exactly one: a new example is never skipped by accident).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
# README.md, "Paths in the examples": every /models/... path is a placeholder for downloaded weights
# (configs/README.md lists them), and so is every folder that a command reading one writes.
PLACEHOLDER = "/models/"
OUTPUT_FLAGS = ("--out", "--output-dir")  # the flags and config keys that name a command's output
OUTPUT_KEYS = ("out", "output_dir")
CHAIN = ("&&", ";")  # split into separate commands; any other shell operator is refused


@dataclass(frozen=True)
class Block:
    language: str  # the fence's info string, "" if none
    line: int  # 1-based line of the first line inside the fence
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    source: str  # "README.md", "docs/formats.md"
    line: int  # 1-based line where the command starts
    position: int  # its place in a chain on that line: 1, 2, ...
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def id(self) -> str:
        words = [self.argv[0], *(w for w in self.argv[1:2] if re.fullmatch(r"[a-z][a-z-]*", w))]
        return f"{self.source}:{self.line}.{self.position}:{'-'.join(words)}"


def fenced_blocks(markdown: str) -> list[Block]:
    """Every ``` fenced block, with its info string and the line its body starts on."""
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if language is None and fence:
            language, start, body = fence.group(1), number + 1, []
        elif language is not None and fence and not fence.group(1):
            blocks.append(Block(language, start, tuple(body)))
            language = None
        elif language is not None:
            body.append(line)
    if language is not None:
        raise ValueError(f"line {start - 1}: fenced block never closed")
    return blocks


def _tokens(text: str) -> list[str]:
    """Shell words with their quotes kept, so a quoted `&&` or `#` is not an operator or a comment."""
    lexer = shlex.shlex(text, posix=False, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if token.startswith("#"):  # a word that starts with # begins a comment, as in bash
            return tokens[:i]
    return tokens


def split_commands(block: Block, source: str) -> list[Command]:
    """The commands of one shell block, each with the line it starts on."""
    console = block.language == "console"
    commands, pending, first = [], "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            if console and not line.startswith("$ "):
                continue  # output shown under a console prompt
            line = line[2:] if console else line
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        argv: list[str] = []
        position = 0
        for token in [*_tokens(text), ";"]:
            if token in CHAIN:
                if argv:
                    position += 1
                    commands.append(Command(source, first, position, tuple(argv)))
                argv = []
            elif re.fullmatch(r"[|&<>()]+", token):
                raise ValueError(f"{source}:{first}: shell operator {token!r} is not supported here; write one "
                                 "command per line (or chain with &&)")
            else:
                argv.extend(shlex.split(token))
    if pending:
        raise ValueError(f"{source}:{first}: the block ends inside a backslash continuation")
    return commands


def shell_commands(root: Path, files: list[str]) -> list[Command]:
    """Every command of every shell block of `files` (paths relative to `root`), in order."""
    return [
        command
        for name in files
        for block in fenced_blocks((root / name).read_text())
        if block.language in SHELL_LANGUAGES
        for command in split_commands(block, name)
    ]


def option(argv: tuple[str, ...], flag: str) -> str | None:
    """The value of `flag` (`--flag VALUE` or `--flag=VALUE`), the last one if repeated."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _config(argv: tuple[str, ...], root: Path) -> dict:
    path = option(argv, "--config")
    return yaml.safe_load((root / path).read_text()) or {} if path and (root / path).is_file() else {}


def inputs(argv: tuple[str, ...], root: Path) -> list[str]:
    """The words a `contentv-rlhf` command reads: its arguments and its `--config` file's values, not outputs."""
    words = [w.split("=", 1)[-1] for i, w in enumerate(argv)
             if not w.startswith(OUTPUT_FLAGS) and not (i and argv[i - 1] in OUTPUT_FLAGS)]
    config = _config(argv, root)
    return words + _strings({k: v for k, v in config.items() if k not in OUTPUT_KEYS})


def outputs(argv: tuple[str, ...], root: Path) -> list[str]:
    config = _config(argv, root)
    named = [option(argv, flag) for flag in OUTPUT_FLAGS] + [config.get(key) for key in OUTPUT_KEYS]
    return [path for path in named if isinstance(path, str)]


def launched(command: Command) -> Command | None:
    """The `contentv-rlhf` command that an `accelerate launch` / `torchrun` of `-m rlhf.cli` runs."""
    if _leading(command.argv, MULTI_DEVICE) and "-m" in command.argv:
        module = command.argv.index("-m")
        if command.argv[module + 1:module + 2] == ("rlhf.cli",):
            return Command(command.source, command.line, command.position,
                           ("contentv-rlhf", *command.argv[module + 2:]))
    return None


def _under(word: str, paths: set[str]) -> bool:
    return any(word == p or word.startswith(p.rstrip("/") + "/") for p in paths)


def placeholder_outputs(commands: list[Command], root: Path) -> set[str]:
    """What the commands that read a placeholder write, and what reads those writes, to a fixed point."""
    runs = [c.argv for c in commands if c.argv[0] == "contentv-rlhf"]
    runs += [inner.argv for c in commands if (inner := launched(c))]
    made: set[str] = set()
    while True:
        more = {out for argv in runs if placeholders_named(argv, root, made) for out in outputs(argv, root)}
        if more <= made:
            return made
        made |= more


def placeholders_named(argv: tuple[str, ...], root: Path, made: set[str]) -> list[str]:
    """The placeholder paths a `contentv-rlhf` command reads: `/models/...`, or what a command on one wrote."""
    return [w for w in inputs(argv, root) if w.startswith(PLACEHOLDER) or _under(w, made)]


# Commands that a named test elsewhere runs: (argv, the test, why not here).
COVERED = {
    ("contentv-rlhf", "quickstart"): (
        "tests/test_quickstart.py",
        "runs it end to end with reduced sizes (--train-steps 4 ...); as written it takes about 5.5 min on 2 "
        "quiet cores",
    ),
    ("python", "-m", "pytest", "-q"): (
        "tests/test_readme_commands.py",
        "the suite itself, which CI runs and which holds this test",
    ),
}
SETUP_PROGRAMS = {  # (leading words) -> what the rule is called
    ("python3", "-m", "venv"): "create a virtual environment",
    ("python", "-m", "venv"): "create a virtual environment",
    (".",): "activate the virtual environment",
    ("source",): "activate the virtual environment",
    ("pip", "install"): "install packages",
    ("apt-get", "install"): "install a system package",
}
MULTI_DEVICE = {("accelerate", "launch"): "accelerate launch", ("torchrun",): "torchrun"}


@dataclass(frozen=True)
class Rule:
    kind: str  # "runs", "setup", "placeholder", "multi-device", "covered"
    name: str
    reason: str


def _leading(argv: tuple[str, ...], table: dict) -> tuple | None:
    return next((lead for lead in table if argv[:len(lead)] == lead), None)


def classify(command: Command, root: Path, made: set[str]) -> list[Rule]:
    """Every rule that matches `command`, given the placeholder outputs `made`; the test requires exactly one."""
    argv, rules = command.argv, []
    if lead := _leading(argv, SETUP_PROGRAMS):
        rules.append(Rule("setup", " ".join(lead), f"setup, not run: {SETUP_PROGRAMS[lead]}"))
    if argv in COVERED:
        test, why = COVERED[argv]
        rules.append(Rule("covered", test, f"covered by {test}: {why}"))
    if lead := _leading(argv, MULTI_DEVICE):
        rules.append(Rule("multi-device", MULTI_DEVICE[lead],
                          "needs several devices; the command it launches is checked up to its placeholder"))
    if argv[0] == "contentv-rlhf" and argv not in COVERED:
        if names := placeholders_named(argv, root, made):
            rules.append(Rule("placeholder", names[0], f"names the placeholder {names[0]}: run up to it only"))
        else:
            rules.append(Rule("runs", argv[1] if len(argv) > 1 else "", "runs as written"))
    return rules
