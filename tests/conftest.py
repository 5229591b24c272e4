"""Shared fixtures: one tiny ContentV checkpoint per test session, built by the project itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlhf.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `contentv-rlhf` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *map(str, args)],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def call_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `contentv-rlhf` in this process (fast: no re-import of torch); returns (code, stdout, stderr)."""
    from rlhf.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
