"""Limits and messages shared by every reader of text that users or other programs hand us (YAML recipes and
configs, ``--set`` values, JSON configs, JSONL data): a hostile or broken file must end in one clean ValueError
that names the flag or field, the file, the line and the column, never in a RecursionError, a hang or an
allocation of gigabytes.

    MAX_DEPTH = 64          nesting of lists / mappings (a real config has 4; Python's parsers recurse per level)
    MAX_NODES = 200_000     values after YAML aliases are expanded (an alias bomb of 300 bytes expands to 10^9)
    MAX_CONFIG_BYTES        size of a YAML / JSON config file (16 MiB), checked before it is read

Values quoted in messages go through ``short`` (``reprlib``: bounded work and length, never the full repr of a
huge or aliased value).
"""

from __future__ import annotations

import reprlib
from pathlib import Path

MAX_DEPTH = 64
MAX_NODES = 200_000
MAX_CONFIG_BYTES = 16 * 2**20

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short(value, limit: int = 80) -> str:
    """A repr of ``value`` at most ``limit`` characters long, computed in bounded time (nested or aliased data is
    not expanded)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that raises (a hostile object): its type is enough
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def line_column(text: str | bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of character (or byte) ``offset`` in ``text``."""
    nl = "\n" if isinstance(text, str) else b"\n"
    line = text.count(nl, 0, offset) + 1
    start = text.rfind(nl, 0, offset) + 1
    return line, offset - start + 1


def decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    """``data`` as UTF-8 text (a leading BOM dropped); ValueError naming ``where``, the line, the column and the
    byte that is not UTF-8. ``first_line`` numbers the first line of ``data`` (a line of a larger file)."""
    try:
        return data.decode("utf-8-sig" if data[:3] == b"\xef\xbb\xbf" else "utf-8")
    except UnicodeDecodeError as e:
        line, col = line_column(data, e.start)
        raise ValueError(
            f"{where} line {line + first_line - 1}, column {col}: byte 0x{data[e.start]:02x} is not "
            f"UTF-8 text ({e.reason}); save the file as UTF-8"
        ) from None


def read_limited(path: str | Path, field: str, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of file ``path``, after checking that it exists and is at most ``max_bytes`` long (before
    reading it). ``field`` names the flag or setting that gave the path."""
    path = Path(path)
    where = f"{field}: {str(path)!r}"
    try:
        size = path.stat().st_size
    except (OSError, ValueError):
        raise FileNotFoundError(f"{field}: {str(path)!r} does not exist") from None
    if not path.is_file():
        raise ValueError(f"{where} is not a file")
    if size > max_bytes:
        raise ValueError(
            f"{where} is {size / 2**20:.1f} MiB; a config file may be at most {max_bytes / 2**20:.0f} MiB"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{where} cannot be read ({e.strerror or e})") from None
    return decode_utf8(data, where)


def too_deep(obj, limit: int = MAX_DEPTH) -> bool:
    """Whether lists / dicts / tuples nest deeper than ``limit`` in ``obj`` (iterative: no recursion, and each
    container is visited once even when it is shared)."""
    stack, seen = [(obj, 1)], set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, list | tuple | dict) or id(node) in seen:
            continue
        if depth > limit:
            return True
        seen.add(id(node))
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | tuple | dict))
    return False
