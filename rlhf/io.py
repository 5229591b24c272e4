"""Atomic file writes: write to a temporary sibling, then rename over the final name.

A reader (or a rerun after `kill -9`) therefore sees either the old file or the complete new one, never
a truncated one. Temporary names start with `.` and contain `.tmp-`, so `remove_stale_temporaries` can
clean what a killed process left behind. `output_path_problem` checks an output path before any work.

Every JSON file is strict JSON (RFC 8259 has no NaN or Infinity, and strict readers reject them): a non-finite
number is written as null, which every format in docs/formats.md reads as "no value".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from rlhf.errors import UserError, write_failure

TMP_MARKER = ".tmp-"


def temporary_path(path: Path) -> Path:
    """A hidden sibling name that keeps the suffix (some writers pick the format from it)."""
    return path.with_name(f".{path.stem}{TMP_MARKER}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "the file") -> Iterator[None]:
    """Turn a failed write inside the block (an OSError or SafetensorError: a full disk, a file size limit, no
    permission, a read-only file system) into a one-line UserError naming `path` and the cause. Bad input, not a
    bug: the caller's cleanup runs as for any error, and the rerun once the cause is fixed completes the work."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: writing {what} failed ({write_failure(err)})") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed (a failed write
    raises UserError, see `writing`)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def finite_json(data: Any) -> Any:
    """`data` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(value) for value in data]
    return data


def dumps(data: Any, **kwargs: Any) -> str:
    """`json.dumps` of strict JSON: non-finite numbers become null (`finite_json`), never `NaN`."""
    return json.dumps(finite_json(data), allow_nan=False, default=str, **kwargs)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, dumps(data, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | Path, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically, with a canonical header (see `canonicalise_header`)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        canonicalise_header(tmp)
    return Path(path)


def canonicalise_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place and at the same length.

    safetensors writes `__metadata__` from a hash map whose order changes from process to process, so the same
    tensors and metadata saved by two runs (an interrupted one's rerun, say) differ in bytes. Sorting the keys
    changes no meaning (every tensor entry carries its own offsets) and no length (the same compact JSON)."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= length:  # safetensors pads its header with spaces to an 8-byte multiple
            handle.seek(8)
            handle.write(text.ljust(length, b" "))


def save_torch(path: str | Path, obj: Any) -> Path:
    """`torch.save`, atomically. Serialised in memory first: torch's file writer reports a full disk as a bare
    "unexpected pos" RuntimeError, a plain write as the OSError it is."""
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def remove_stale_temporaries(root: str | Path) -> int:
    """Delete temporary files left under `root` by killed writers; returns how many."""
    removed = 0
    for path in Path(root).rglob(f".*{TMP_MARKER}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def output_path_problem(path: str | os.PathLike, kind: Literal["file", "dir"]) -> str | None:
    """What stops `path` from becoming an output file or directory (`kind`), or None.

    Commands check each output path before any work, so a path of the wrong kind fails in one line rather
    than in a NotADirectoryError / IsADirectoryError after minutes of sampling or training. The message
    completes "field 'out' ..." or "--out ...".
    """
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        return f"must be a directory, but {path} is a file"
    if kind == "file" and path.is_dir():
        return f"must be a file, but {path} is a directory"
    existing = path if kind == "dir" and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"cannot be created: {existing} is a file, not a directory"
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is not writable"
    return None
