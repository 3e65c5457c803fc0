"""Command-line checks that collect every problem before any work, then raise them together.

problems = []
need_file(problems, "--data", args.data)
at_least(problems, "--batch-size", args.batch_size, 1)
raise_problems(problems)          # ConfigError("invalid command line (2 problems): ...") or nothing
"""

from __future__ import annotations

from pathlib import Path

from moe_lora.errors import ConfigError
from moe_lora.paths import dangerous_output_dir, symlinks_in, unwritable_reason


def need_file(problems: list[str], flag: str, value: str | None, required: bool = True) -> None:
    if value is None:
        if required:
            problems.append(f"{flag}: required")
    elif not Path(value).expanduser().is_file():
        problems.append(f"{flag}: file {value!r} does not exist")


def need_dir(problems: list[str], flag: str, value: str | None) -> None:
    if value is not None and not Path(value).expanduser().is_dir():
        problems.append(f"{flag}: directory {value!r} does not exist")


def writable_dir(
    problems: list[str], flag: str, value: str | None, required: bool = True, owned: tuple[str, ...] | None = None
) -> None:
    """An output directory: given (when required), not an existing file, not the root / home / current directory
    or an ancestor of it, creatable and writable (no parent that is a file, no read-only mount). With ``owned``
    (the names a command writes there), an existing directory must hold nothing else and no symbolic link."""
    if value is None:
        if required:
            problems.append(f"{flag}: required")
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        problems.append(f"{flag}: {value!r} exists and is not a directory")
        return
    why = dangerous_output_dir(path) or unwritable_reason(path)
    if why:
        problems.append(f"{flag}: {why}")
    elif owned is not None and path.is_dir():
        links = symlinks_in(path)
        foreign = sorted(c.name for c in path.iterdir() if c.name not in owned)
        if path.is_symlink() or links:
            problems.append(
                f"{flag}: {value!r} is or holds a symbolic link ({', '.join(links[:5]) or value}); "
                "outputs are never written through links: remove them or use another directory"
            )
        elif foreign:
            problems.append(
                f"{flag}: {value!r} is not empty ({', '.join(foreign[:5])}"
                f"{' ...' if len(foreign) > 5 else ''}); give a new or empty directory"
            )


def at_least(problems: list[str], flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        problems.append(f"{flag}: {value} must be >= {minimum}")


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems, "command line")
