"""Every shell command of README.md and docs/*.md is run, or skipped by a named rule (issue #26).

`tests/readme_commands.py` splits each ```bash / sh / shell / console block into commands and classifies
each one by exactly one rule; a command no rule claims, or two rules claim, fails its test case, so a new
example cannot be skipped by accident. Each command is its own case (`README.md:<line>.<n>:<program>`).

- **runs** (`contentv-rlhf` naming no placeholder): run as written through the installed entry point, in a
  fresh folder holding symlinks to the repository's tracked top-level entries (the README says "run these
  from the repository root"), so nothing is written into the repository. The outputs of other examples it
  reads are made first: `quickstart-out/train/adapter` (and `reward_gradient/adapter`) is a rank-4 LoRA on the
  world transformer that records its base, the kind of adapter the quickstart's train stages write (the
  quickstart itself runs in tests/test_quickstart.py). Checked: exit 0, and a generated mp4 has the model's sampling defaults (frames,
  height, width from `MODEL/sampling_defaults.json`). A command that serves a page (`compare`) is started,
  must print its address and answer it, and must stop on Ctrl-C (SIGINT, exit 0); it gets `--port` on a
  free port when it names none, since its default 7860 may be taken on a shared machine. No size is reduced.
- **setup** (`python3 -m venv`, `. .venv/bin/activate`, `pip install`, `apt-get install`): not run; an
  editable install's extras (`-e '.[app]'`) must exist in pyproject.toml.
- **placeholder** (`contentv-rlhf` reading, in its arguments or its `--config` file, a `/models/...` path or
  what a command reading one writes, such as `runs/rollout-r0`; README "Paths in the examples" names them):
  run in-process up to the placeholder. It must exit 2 with one error line naming a placeholder path, which
  shows that its flags and config parse and validate; nothing loads. If a real `/models/...` path it names
  exists, the case is skipped rather than run on an 8B model.
- **multi-device** (`accelerate launch`, `torchrun`): the accelerate config must exist and ask for several
  processes; the launched `-m rlhf.cli ...` command must be a placeholder command and is checked as one.
  tests/test_sharded_training.py runs the layouts on 2 CPU processes.
- **covered** (named in `readme_commands.COVERED`): another test runs it; the named test file must exist and
  mention it. `contentv-rlhf quickstart` as written takes ~5.5 min on 2 quiet cores: tests/test_quickstart.py
  runs it with reduced sizes. `python -m pytest -q` is this suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, call_cli, random_adapter
from tests.readme_commands import (
    CHAIN,
    COVERED,
    PLACEHOLDER,
    SHELL_LANGUAGES,
    Block,
    Command,
    classify,
    fenced_blocks,
    inputs,
    launched,
    option,
    placeholder_outputs,
    shell_commands,
    split_commands,
)

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
COMMANDS = shell_commands(REPO, DOCS)
MADE = placeholder_outputs(COMMANDS, REPO)  # what the commands on a placeholder write: placeholders too
ENTRY_POINT = Path(sys.executable).parent / "contentv-rlhf"
SERVERS = {"compare": "compare: serving http://127.0.0.1:{port}/"}  # subcommand -> the line it prints when up
# outputs of other examples that runnable ones read
PREREQUISITES = ("quickstart-out/train/adapter", "quickstart-out/reward_gradient/adapter")


# ---- the parser, on blocks worked by hand ---------------------------------------------------------------

def test_split_commands_joins_continuations_splits_chains_and_drops_comments():
    block = Block("bash", 10, (
        "python3 -m venv .venv && . .venv/bin/activate   # set-up",
        "contentv-rlhf generate --model m --prompt \"a red && blue # fox\" \\",
        "    --out fox.mp4 --seed 1",
        "# a whole-line comment",
        "",
        "pip install -e '.[app]'; contentv-rlhf compare --weights '{clip: 1.0, aesthetic: 0.5}'",
    ))
    assert [(c.line, c.position, c.argv) for c in split_commands(block, "R.md")] == [
        (10, 1, ("python3", "-m", "venv", ".venv")),
        (10, 2, (".", ".venv/bin/activate")),
        (11, 1, ("contentv-rlhf", "generate", "--model", "m", "--prompt", "a red && blue # fox", "--out",
                 "fox.mp4", "--seed", "1")),
        (15, 1, ("pip", "install", "-e", ".[app]")),
        (15, 2, ("contentv-rlhf", "compare", "--weights", "{clip: 1.0, aesthetic: 0.5}")),
    ]
    assert [c.id for c in split_commands(block, "R.md")][2:4] == ["R.md:11.1:contentv-rlhf-generate",
                                                                   "R.md:15.1:pip-install"]


def test_console_blocks_keep_only_prompted_lines():
    block = Block("console", 3, ("$ contentv-rlhf tiny-model out \\", "    --seed 2", "wrote out", "$ ls out"))
    assert [(c.line, c.argv) for c in split_commands(block, "R.md")] == [
        (3, ("contentv-rlhf", "tiny-model", "out", "--seed", "2")), (6, ("ls", "out"))]


@pytest.mark.parametrize("line", ["contentv-rlhf generate | tee log", "a > b", "sleep 1 &", "x \\"])
def test_pipes_redirections_and_open_continuations_are_refused(line):
    with pytest.raises(ValueError):
        split_commands(Block("bash", 1, (line,)), "R.md")


def test_fenced_blocks_report_language_and_first_line():
    text = "intro\n```bash\na\nb\n```\ntext\n```\nMODEL/\n```\n```python\nx = 1\n```\n"
    assert fenced_blocks(text) == [Block("bash", 3, ("a", "b")), Block("", 8, ("MODEL/",)),
                                   Block("python", 11, ("x = 1",))]
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```bash\na\n")


# ---- the documents --------------------------------------------------------------------------------------

def test_readme_marks_the_placeholders_the_rules_skip_by_name():
    readme = (REPO / "README.md").read_text()
    marking = re.search(r"\*\*Paths in the examples\.\*\*(.*?)\n\n", readme, re.S)
    assert marking, "README.md lost its 'Paths in the examples' paragraph"
    assert "`/models/ContentV-8B` is a placeholder" in marking.group(1) and f"`{PLACEHOLDER}...`" in marking.group(1)
    # Every folder that a placeholder rule skips for is named there: under /models/, or listed by name.
    listed = set(re.findall(r"`([^`]+)`", marking.group(1)))
    for command in COMMANDS:
        for rule in classify(launched(command) or command, REPO, MADE):
            if rule.kind == "placeholder" and not rule.name.startswith(PLACEHOLDER):
                assert any(rule.name == p or rule.name.startswith(p + "/") for p in listed), \
                    f"{command.id}: README's 'Paths in the examples' does not name {rule.name} as a placeholder"
    # Every ContentV path in a shell example is the one placeholder (or an output beside it, ContentV-8B-dpo).
    named = {w for c in COMMANDS for w in c.argv if "ContentV" in w}
    assert "/models/ContentV-8B" in named and all(w.startswith("/models/ContentV-8B") for w in named), named


def test_commands_appear_only_in_shell_blocks():
    """A command in an unlabeled or other block would escape this test: it must be in a shell block."""
    command = re.compile(r"^\s*(\$ |contentv-rlhf |pip install |accelerate launch |torchrun |python3? -m )")
    for name in DOCS:
        for block in fenced_blocks((REPO / name).read_text()):
            if block.language not in SHELL_LANGUAGES:
                stray = [line for line in block.lines if command.match(line)]
                assert not stray, f"{name}:{block.line}: commands in a ```{block.language} block: {stray}"
    assert len(COMMANDS) > 20 and all(c.argv and c.argv[0] not in CHAIN for c in COMMANDS)


# ---- every command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def readme_adapter(tmp_path_factory) -> Path:
    """A rank-4 LoRA on the world transformer recording its base: what the quickstart's train stage writes."""
    import torch

    from rlhf.base_model import identity, write_record
    from rlhf.world import MODEL_DIR

    torch.manual_seed(0)
    adapter = random_adapter(MODEL_DIR, tmp_path_factory.mktemp("quickstart-train") / "adapter", std=0.2)
    write_record(adapter, identity(MODEL_DIR))
    return adapter


def repository_view(folder: Path) -> Path:
    """`folder` with a symlink to each tracked top-level entry of the repository: its root, without outputs."""
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
    for name in sorted({path.split("/", 1)[0] for path in tracked.stdout.splitlines()}):
        (folder / name).symlink_to(REPO / name)
    return folder


def extras_defined() -> set[str]:
    """The names of pyproject.toml's [project.optional-dependencies] (tomllib is Python >= 3.11 only)."""
    section = (REPO / "pyproject.toml").read_text().split("\n[project.optional-dependencies]\n", 1)[1]
    return set(re.findall(r"^([\w-]+)\s*=", section.split("\n[", 1)[0], re.M))


def check_setup(command: Command, reason: str) -> None:
    editable = option(command.argv, "-e")
    if editable:
        extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", editable)
        assert extras, f"editable install of {editable!r}, not of this repository"
        defined = extras_defined()
        for extra in (extras.group(1) or "").split(","):
            assert not extra or extra in defined, f"extra {extra!r} is not in pyproject.toml ({sorted(defined)})"
    pytest.skip(reason)


def check_covered(command: Command, test: str, reason: str, testpaths: list[str]) -> None:
    assert (REPO / test).is_file(), test
    if test == "tests/test_readme_commands.py":  # the suite: CI's pytest collects this file
        assert Path(__file__).parent.name in testpaths
    else:
        assert f'"{command.argv[1]}"' in (REPO / test).read_text(), f"{test} does not run {command.argv[1]}"
    pytest.skip(reason)


def check_up_to_placeholder(argv: tuple[str, ...], folder: Path, capsys, monkeypatch) -> None:
    """Run `contentv-rlhf ARGS` in-process in `folder`: it must stop with exit 2 on a placeholder path."""
    existing = [w for w in inputs(argv, REPO) if w.startswith(PLACEHOLDER) and Path(w).exists()]
    if existing:
        pytest.skip(f"{existing[0]} exists here: the suite does not run the real model")
    monkeypatch.chdir(folder)
    code, _, err = call_cli(capsys, *argv[1:])
    lines = [line for line in err.splitlines() if line.startswith("contentv-rlhf ")]
    assert code == 2 and lines, f"exit {code}, stderr:\n{err[-2000:]}"
    error = lines[-1].removeprefix(f"contentv-rlhf {argv[1]}: error: ")
    assert error != lines[-1] and (PLACEHOLDER in error or any(error.startswith(path) for path in MADE)), \
        f"stopped on something other than a placeholder: {lines[-1]}"


def check_multi_device(command: Command, folder: Path, capsys, monkeypatch) -> None:
    argv = command.argv
    if argv[0] == "accelerate":
        config = option(argv, "--config_file")
        assert config and (REPO / config).is_file(), f"accelerate config {config!r} not found"
        settings = yaml.safe_load((REPO / config).read_text())
        assert settings["num_processes"] > 1 and settings["distributed_type"] != "NO", settings
    inner = launched(command)
    assert inner, f"{command.text}: launches no `-m rlhf.cli` command"
    assert [rule.kind for rule in classify(inner, REPO, MADE)] == ["placeholder"], \
        f"{inner.text} names no placeholder: it would run here, on one process"
    check_up_to_placeholder(inner.argv, folder, capsys, monkeypatch)


def expected_video_shape(argv: tuple[str, ...], folder: Path) -> tuple[int, int, int, int]:
    """(frames, height, width, 3) from the model's sampling defaults, overridden by the flags."""
    defaults = json.loads((folder / option(argv, "--model") / "sampling_defaults.json").read_text())
    return tuple(int(option(argv, f"--{k}") or defaults[k]) for k in ("frames", "height", "width")) + (3,)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_and_stop(argv: list[str], served: str, folder: Path) -> None:
    """Start a server command, fetch its page, stop it with Ctrl-C (SIGINT)."""
    if "--port" not in argv:
        argv += ["--port", str(free_port())]
    address = served.format(port=option(tuple(argv), "--port"))
    stdout, stderr = folder / "server.out", folder / "server.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        # As in a terminal, where Ctrl-C reaches a foreground command: a suite started in the background by a
        # non-interactive shell (`pytest &`) ignores SIGINT, and a child would inherit that and never see it.
        server = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while address not in stdout.read_text():
            assert server.poll() is None, f"exited with {server.returncode}: {stderr.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"not served in 300 s: {stderr.read_text()[-2000:]}"
            time.sleep(0.5)
        url = re.search(r"http://\S+/", address).group(0)
        with urllib.request.urlopen(url, timeout=60) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        server.send_signal(signal.SIGINT)  # Gradio's block_thread returns on Ctrl-C: a normal end, exit 0
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after Ctrl-C;\nstdout:\n{stdout.read_text()[-1000:]}\n"
                        f"stderr:\n{stderr.read_text()[-3000:]}")
        assert code == 0, stderr.read_text()[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def check_runs(command: Command, folder: Path, adapter: Path) -> None:
    assert ENTRY_POINT.is_file(), f"{ENTRY_POINT} missing: install the package (pip install -e .)"
    argv = [str(ENTRY_POINT), *command.argv[1:]]
    for word in command.argv:
        for made in PREREQUISITES:
            if word.startswith(made) and not (folder / made).exists():
                shutil.copytree(adapter, folder / made)
    if command.argv[1] in SERVERS:
        serve_and_stop(argv, SERVERS[command.argv[1]], folder)
        return
    result = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = option(command.argv, "--out")
    if command.argv[1] == "generate":
        from rlhf.video import read_video

        assert read_video(folder / out).shape == expected_video_shape(command.argv, folder)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command(command, tmp_path, capsys, monkeypatch, request):
    rules = classify(command, REPO, MADE)
    assert len(rules) == 1, (f"{command.source}:{command.line}: `{command.text}` is claimed by "
                             f"{[r.kind + ' ' + r.name for r in rules] or 'no rule'}: give it exactly one "
                             "(tests/readme_commands.py)")
    rule = rules[0]
    if rule.kind == "setup":
        check_setup(command, rule.reason)
    elif rule.kind == "covered":
        check_covered(command, COVERED[command.argv][0], rule.reason, request.config.getini("testpaths"))
    elif rule.kind == "placeholder":
        check_up_to_placeholder(command.argv, repository_view(tmp_path), capsys, monkeypatch)
    elif rule.kind == "multi-device":
        check_multi_device(command, repository_view(tmp_path), capsys, monkeypatch)
    else:
        assert rule.kind == "runs", rule
        check_runs(command, repository_view(tmp_path), request.getfixturevalue("readme_adapter"))
