"""Reading YAML that people write by hand: plain data only (``yaml.SafeLoader``: never Python objects or code),
bounded, and every problem a ValueError that names the setting, the file, the line and the column.

Before anything is built, one pass over the parser's events (iterative, no recursion) measures the document:
nesting deeper than ``MAX_DEPTH`` or more than ``MAX_NODES`` values once aliases are expanded (an "alias bomb"
of a few hundred bytes names 10^9 values) stops there, at the line and column where the limit is crossed, and
so does an alias that refers to its own enclosing node (a cycle). Only then is the document constructed (by
the recursive PyYAML constructor, safe at that depth).

Scalars: YAML 1.1 reads ``1e-4`` (no dot) as a string; numbers in YAML 1.2 / JSON form (``1e-4``, ``3E5``,
``-2e+3``) are read as floats here, as people mean them (``--set optimizer.lr=1e-4``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .text_limits import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_NODES, read_limited


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (YAML 1.2's core schema)."""


_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _at(mark) -> str:
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def _measure(text: str, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH or more than MAX_NODES values after alias expansion (see module doc).

    Per open collection the stack holds [values inside so far, height below it, anchor]; an anchor's expanded
    size and height are recorded when its node ends, and every alias adds them where it is used."""
    sizes: dict[str, tuple[int, int]] = {}
    open_anchors: set[str] = set()
    stack: list[list] = [[0, 0, None]]
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise ValueError(
                    f"{where}{_at(event.start_mark)}: alias *{event.anchor} refers to a node that "
                    "contains it (a cycle); not allowed"
                )
            size, height = sizes.get(event.anchor, (1, 0))
        elif isinstance(event, yaml.ScalarEvent):
            size, height = 1, 0
            if event.anchor is not None:
                sizes[event.anchor] = (1, 0)
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(stack) > MAX_DEPTH:
                raise ValueError(f"{where}{_at(event.start_mark)}: nested deeper than {MAX_DEPTH} levels")
            stack.append([0, 0, event.anchor])
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            count, below, anchor = stack.pop()
            size, height = count + 1, below + 1
            if anchor is not None:
                open_anchors.discard(anchor)
                sizes[anchor] = (size, height)
        else:
            continue
        top = stack[-1]
        top[0] += size
        top[1] = max(top[1], height)
        if len(stack) - 1 + height > MAX_DEPTH:
            raise ValueError(
                f"{where}{_at(event.start_mark)}: nested deeper than {MAX_DEPTH} levels (with the aliases expanded)"
            )
        if top[0] > MAX_NODES or sum(s[0] for s in stack) > MAX_NODES:
            raise ValueError(
                f"{where}{_at(event.start_mark)}: more than {MAX_NODES} values once aliases are "
                "expanded (an alias bomb?); refusing to build it"
            )


def parse_yaml(text: str, where: str) -> Any:
    """The plain data of YAML ``text``; ``where`` (e.g. "--config: 'configs/x.yaml'") starts every message."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{where} is {len(text) / 2**20:.1f} MiB of text; at most {MAX_CONFIG_BYTES // 2**20} MiB is read"
        )
    try:
        _measure(text, where)
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML{_at(mark)}: {problem}") from None
    except (ValueError, TypeError, OverflowError) as e:  # a constructor's own error ('!!int 0x', '!!float x')
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where} is not valid YAML: {str(e)[:200]}") from None


def read_yaml(path: str | Path, field: str) -> Any:
    """The YAML file ``path`` as plain data; ``field`` names the setting or flag that gave the path."""
    return parse_yaml(read_limited(path, field), f"{field}: {str(Path(path))!r}")
