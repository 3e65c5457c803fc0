"""Reading JSON that other programs or people hand us (adapter configs, DeepSpeed configs, config.json, reports,
JSONL lines): bounded nesting, and every problem a ValueError that names the field or flag, the file, the line
and the column.

``json.loads`` recurses once per nesting level: 100 000 ``[`` end in a RecursionError, and a document just
under Python's limit would overflow the recursion of whatever walks it next. Nesting deeper than ``MAX_DEPTH``
is refused with the position where it crosses the limit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .text_limits import MAX_CONFIG_BYTES, MAX_DEPTH, line_column, read_limited, too_deep

_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _deep_at(text: str) -> int:
    """Offset of the first bracket that opens level MAX_DEPTH + 1 (strings skipped), or 0."""
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return m.start()
        elif c in "]}":
            depth -= 1
    return 0


def parse_json(text: str, where: str, line: int | None = None) -> Any:
    """The value of JSON ``text``; ``where`` (e.g. "deepspeed: 'ds.json'") starts every message. ``line``: the
    number of the line ``text`` is (one JSONL record), named in messages instead of a line inside ``text``."""
    at = "" if line is None else f" line {line}"

    def position(offset_line: int, col: int) -> str:
        return f"at column {col}" if line is not None else f"at line {offset_line} column {col}"

    try:
        value = json.loads(text)
        deep = too_deep(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}{at} is not valid JSON: {e.msg} {position(e.lineno, e.colno)}") from None
    except RecursionError:
        deep = True
    except ValueError as e:  # an integer of more than 4300 digits
        raise ValueError(f"{where}{at} is not valid JSON: {str(e)[:120]}") from None
    if deep:
        ln, col = line_column(text, _deep_at(text))
        raise ValueError(f"{where}{at} is nested deeper than {MAX_DEPTH} levels ({position(ln, col)})")
    return value


def read_json(path: str | Path, field: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON file ``path`` (UTF-8, at most ``max_bytes``); ``field`` names the setting or flag that gave it."""
    return parse_json(read_limited(path, field, max_bytes), f"{field}: {str(Path(path))!r}")


def read_json_object(path: str | Path, field: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """``read_json`` that must give a JSON object."""
    data = read_json(path, field, max_bytes)
    if not isinstance(data, dict):
        raise ValueError(f"{field}: {str(Path(path))!r} holds a JSON {type(data).__name__}; expected a JSON object")
    return data
