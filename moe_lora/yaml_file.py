"""Reading YAML that people write by hand: ``yaml.safe_load`` only (plain data, never Python objects or code),
and a syntax error becomes a ValueError that names the setting, the file, the line and the column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; ``where`` (e.g. "--config: configs/x.yaml") starts the error message."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML{at}: {problem}") from None


def read_yaml(path: str | Path, field: str) -> Any:
    """The YAML file ``path`` as plain data; ``field`` names the setting or flag that gave the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {str(path)!r} does not exist")
    return parse_yaml(path.read_text(encoding="utf-8"), f"{field}: {str(path)!r}")
