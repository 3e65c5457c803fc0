"""Reading JSONL data files: one JSON object per line, blank lines skipped, errors that name the flag or field,
the file, the line and the column (undecodable bytes and nesting too: moe_lora/json_file.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .json_file import parse_json
from .text_limits import decode_utf8

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
            if _SURROGATE_ESCAPE.search(raw):  # "\ud800" alone decodes to a lone surrogate: no tokenizer takes it
                try:
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(
                        f"{where} line {lineno}: a \\u escape gives a lone surrogate "
                        f"({e.object[e.start]!r}), which is not text; fix or drop the record"
                    ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where} line {lineno} must be a JSON object, got {type(obj).__name__}")
            yield lineno, obj
