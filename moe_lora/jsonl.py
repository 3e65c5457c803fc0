"""Reading JSONL data files: one JSON object per line, blank lines skipped, errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_json_objects(path: str | Path, field: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``. A line that is not JSON, or not a JSON
    object, raises ValueError naming ``field`` (the setting or flag that gave the path), the file and the line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field}: {path} line {lineno} is not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{field}: {path} line {lineno} must be a JSON object, got {type(obj).__name__}")
            yield lineno, obj
