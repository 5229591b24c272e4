"""Reading prompt lists: `.txt` (one per line), `.jsonl` / `.csv` (a `prompt` column), or a `datasets` folder.

Empty entries and duplicates are dropped, but never silently: `load_prompts` returns what it dropped and
where, and callers log it. Prompt ids are `p00000`, `p00001`, ... in file order after dropping.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import UserError

PROMPT_COLUMN = "prompt"


@dataclass
class PromptList:
    prompts: list[str]
    source: Path
    empty_rows: list[int] = field(default_factory=list)  # 1-based rows/lines that held no prompt
    duplicate_rows: list[int] = field(default_factory=list)  # rows repeating an earlier prompt

    @property
    def ids(self) -> list[str]:
        return [prompt_id(i) for i in range(len(self.prompts))]

    def report(self) -> str | None:
        """One line describing what was dropped, or None."""
        parts = []
        if self.empty_rows:
            parts.append(f"{len(self.empty_rows)} empty (rows {_rows(self.empty_rows)})")
        if self.duplicate_rows:
            parts.append(f"{len(self.duplicate_rows)} duplicate (rows {_rows(self.duplicate_rows)})")
        return f"{self.source}: skipped {' and '.join(parts)} prompt(s)" if parts else None


def prompt_id(index: int) -> str:
    return f"p{index:05d}"


def _rows(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (", ..." if len(rows) > limit else "")


def _raw_rows(path: Path) -> list:
    suffix = path.suffix.lower()
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"{path}: not a `datasets` folder saved with save_to_disk ({err})") from None
        if PROMPT_COLUMN not in dataset.column_names:
            raise UserError(f"{path}: dataset has no '{PROMPT_COLUMN}' column (columns: {dataset.column_names})")
        return list(dataset[PROMPT_COLUMN])
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return text.splitlines()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                rows.append(None)
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path}: line {number} is not valid JSON ({err})") from None
            if not isinstance(record, dict) or PROMPT_COLUMN not in record:
                raise UserError(f"{path}: line {number} has no '{PROMPT_COLUMN}' field")
            rows.append(record[PROMPT_COLUMN])
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or PROMPT_COLUMN not in reader.fieldnames:
            raise UserError(f"{path}: CSV has no '{PROMPT_COLUMN}' column (columns: {reader.fieldnames})")
        return [row[PROMPT_COLUMN] for row in reader]
    raise UserError(f"{path}: unsupported prompt file type; expected .txt, .jsonl, .csv or a datasets folder")


def load_prompts(path: str | Path) -> PromptList:
    """Read prompts from `path`, dropping (and recording) empty and duplicate entries."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: prompt file not found")
    try:
        rows = _raw_rows(path)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: could not be read ({err})") from None
    result = PromptList(prompts=[], source=path)
    seen: set[str] = set()
    for number, raw in enumerate(rows, 1):
        prompt = " ".join(str(raw).split()) if raw is not None else ""
        if not prompt:
            result.empty_rows.append(number)
        elif prompt in seen:
            result.duplicate_rows.append(number)
        else:
            seen.add(prompt)
            result.prompts.append(prompt)
    if not result.prompts:
        raise UserError(f"{path}: no prompts found (the file is empty or holds only blank entries)")
    return result
