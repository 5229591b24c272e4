"""Appending a benchmark's figures, with the command that produced them, to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


def record(name: str, result: Any, text: str | None = None) -> None:
    """Append `result` (JSON) or `text` (preformatted) under a dated heading with the exact command line."""
    command = shlex.join(["python", "benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])  # runnable as shown
    body = text if text is not None else json.dumps(result, indent=2)
    fence = "```" if text is not None else "```json"
    with open(RESULTS, "a") as fh:
        fh.write(f"\n### {name} ({datetime.date.today()})\n\n`{command}`\n\n{fence}\n{body}\n```\n")


def emit_rows(name: str, rows: list[dict[str, Any]], seconds: float, to_results: bool) -> None:
    """Print one JSON line per row and the benchmark's total time; with `to_results`, also `record` the rows."""
    for row in rows:
        print(json.dumps(row))
    print(f"{name}: {seconds:.0f} s in all", flush=True)
    if to_results:
        record(name, rows)
