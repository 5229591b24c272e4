"""Atomic file writes: write to a temporary sibling, then rename over the final name.

A reader (or a rerun after `kill -9`) therefore sees either the old file or the complete new one, never
a truncated one. Temporary names start with `.` and contain `.tmp-`, so `remove_stale_temporaries` can
clean what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


def temporary_path(path: Path) -> Path:
    """A hidden sibling name that keeps the suffix (some writers pick the format from it)."""
    return path.with_name(f".{path.stem}{TMP_MARKER}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_tensors(path: str | Path, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def remove_stale_temporaries(root: str | Path) -> int:
    """Delete temporary files left under `root` by killed writers; returns how many."""
    removed = 0
    for path in Path(root).rglob(f".*{TMP_MARKER}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
