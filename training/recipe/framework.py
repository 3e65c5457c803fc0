"""The section machinery of a recipe: fields with help strings, nested sections, building a section from a mapping
with every unknown key reported (close-match suggestion included), the help text, and dotted-key overrides.

A section is a dataclass whose fields are made by ``option`` (a value with its help string) or ``section`` (a
nested section). Each section checks its own values in ``problems()``, returning messages that name the dotted
field and the value; nothing here knows what a section means.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, field, fields
from typing import Any

from moe_lora.errors import ConfigError, suggest
from moe_lora.text_limits import short
from moe_lora.yaml_file import parse_yaml


def option(default, help: str):
    """A field with its help string; a list or dict default is copied for each instance."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls, help: str):
    """A field holding a nested section (a fresh ``cls()`` by default)."""
    return field(default_factory=cls, metadata={"help": help, "section": cls})


def subsections(cls) -> dict[str, type]:
    """{field name: section class} of the nested sections of ``cls``."""
    return {f.name: f.metadata["section"] for f in fields(cls) if "section" in f.metadata}


def default_of(f):
    return f.default if f.default is not MISSING else f.default_factory()


def section_help(cls, prefix: str) -> list[str]:
    """One indented line per field of ``cls`` (and of its nested sections): name (default): help."""
    lines = []
    for f in fields(cls):
        sub = f.metadata.get("section")
        if sub is not None:
            lines.append(f"  {prefix}.{f.name}:  {f.metadata['help']}")
            lines += section_help(sub, f"{prefix}.{f.name}")
            continue
        lines.append(f"  {prefix}.{f.name} (default {default_of(f)!r}):  {f.metadata['help']}")
    return lines


def section_dict(v):
    """A section (nested sections included) as plain data."""
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: section_dict(getattr(v, f.name)) for f in fields(v)}
    return v


def build_section(cls, value, prefix: str):
    """(section instance, problems) from a mapping; unknown keys become problems instead of exceptions."""
    if value is None:
        return cls(), []
    if not isinstance(value, dict):
        return cls(), [f"{prefix}: expected a mapping, got {type(value).__name__} {short(value)}"]
    known = [f.name for f in fields(cls)]
    nested = subsections(cls)
    problems, kwargs = [], {}
    for k, v in value.items():
        if k not in known:
            problems.append(f"{prefix}.{k}: unknown field{suggest(k, known)}; allowed: {', '.join(known)}")
            continue
        if k in nested:
            v, sub_problems = build_section(nested[k], v, f"{prefix}.{k}")
            problems += sub_problems
        kwargs[k] = v
    return cls(**kwargs), problems


def _plain_copy(value):
    """A deep copy of YAML-like data with tuples as lists. Not a JSON round trip: YAML also gives dates, bytes and
    sets, which must reach validation (it names their field) rather than crash the copy."""
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_copy(v) for v in value]
    return copy.deepcopy(value)


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``{"train.max_steps": 5, "moe_lora.rank": 4}``) in a nested mapping (a copy)."""
    out = _plain_copy(data)
    for dotted, value in (overrides or {}).items():
        parts = str(dotted).split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=5' -> ('train.max_steps', 5); the value is parsed as YAML (bounded, and exponent numbers
    such as 1e-4 are floats: moe_lora/yaml_file.py)."""
    if "=" not in text:
        raise ConfigError([f"--set: {short(text)} must look like section.field=value"], "command line")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), parse_yaml(raw, f"--set {short(text)}: the value")
    except ValueError as e:
        raise ConfigError([str(e)], "command line") from None
