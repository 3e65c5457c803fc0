"""Write a generated block into a markdown file between two marker lines, so that a benchmark's command
regenerates its table in the README (``--readme README.md``)::

    <!-- NAME -->
    ... replaced on every run ...
    <!-- /NAME -->
"""

from __future__ import annotations

from pathlib import Path

from moe_lora.atomic_dir import write_text_atomic


def write_between_markers(path: Path, name: str, block: str) -> None:
    """Replace what lies between the lines ``<!-- name -->`` and ``<!-- /name -->`` of ``path`` with ``block``
    (atomically); a clear error when the markers are missing."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = Path(path).read_text()
    head, found, rest = text.partition(begin)
    if not found or end not in rest:
        raise SystemExit(f"--readme: {path} has no {begin} line followed by a {end} line to write the table between")
    tail = rest.split(end, 1)[1]
    write_text_atomic(Path(path), f"{head}{begin}\n{block.strip()}\n{end}{tail}")
