"""Command-line checks that collect every problem before any work, then raise them together.

    problems = []
    need_file(problems, "--data", args.data)
    at_least(problems, "--batch-size", args.batch_size, 1)
    raise_problems(problems)          # ConfigError("invalid command line (2 problems): ...") or nothing
"""

from __future__ import annotations

from pathlib import Path

from moe_lora.errors import ConfigError


def need_file(problems: list[str], flag: str, value: str | None, required: bool = True) -> None:
    if value is None:
        if required:
            problems.append(f"{flag}: required")
    elif not Path(value).expanduser().is_file():
        problems.append(f"{flag}: file {value!r} does not exist")


def need_dir(problems: list[str], flag: str, value: str | None) -> None:
    if value is not None and not Path(value).expanduser().is_dir():
        problems.append(f"{flag}: directory {value!r} does not exist")


def writable_dir(problems: list[str], flag: str, value: str | None, required: bool = True) -> None:
    """An output directory: given (when required) and not an existing file."""
    if value is None:
        if required:
            problems.append(f"{flag}: required")
    elif Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
        problems.append(f"{flag}: {value!r} exists and is not a directory")


def at_least(problems: list[str], flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        problems.append(f"{flag}: {value} must be >= {minimum}")


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems, "command line")
