"""Reading JSONL data files: one JSON object per line, blank lines skipped, errors that name the flag or field,
the file, the line and the column (undecodable bytes and nesting too: moe_lora/json_file.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .json_file import parse_json
from .text_limits import decode_utf8


def iter_json_objects(path: str | Path, field: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``. A line that is not UTF-8, not JSON, or not a
    JSON object raises ValueError naming ``field`` (the setting or flag that gave the path), the file and the
    line."""
    path = Path(path)
    where = f"{field}: {path}"
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            obj = parse_json(decode_utf8(raw, where, lineno), where, lineno)
            if not isinstance(obj, dict):
                raise ValueError(f"{where} line {lineno} must be a JSON object, got {type(obj).__name__}")
            yield lineno, obj
