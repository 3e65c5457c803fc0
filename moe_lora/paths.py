"""Output paths that stay inside their output directory.

Everything a run writes goes under one directory the user chose (``output_dir``, ``--out``). ``inside(root,
*parts)`` joins the parts and refuses a result that leaves ``root``, whether by ``..``, an absolute part or a
symbolic link met on the way (``root/checkpoints -> /etc``): a shared machine's stale link or a hand-made
name can then never make a run write or delete elsewhere.

Checks before a run starts: ``dangerous_output_dir`` (the root, the home directory, the current directory or
an ancestor of it), ``unwritable_reason`` (a parent that is a file, a read-only mount, no permission) and
``symlinks_in`` (links inside a directory a command replaces).
"""

from __future__ import annotations

import os
from pathlib import Path


def inside(root: str | Path, *parts: str | Path) -> Path:
    """``root / parts...`` (not resolved: the path as the user would write it), after checking that it resolves
    to ``root`` itself or a path under it. Raises ValueError naming both paths otherwise."""
    root = Path(root)
    path = root.joinpath(*parts)
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise ValueError(
            f"output path {str(path)!r} resolves to {str(real)!r}, outside the output directory "
            f"{str(real_root)!r} (a '..' part, an absolute part or a symbolic link); refusing to write"
        )
    return path


def dangerous_output_dir(path: str | Path) -> str | None:
    """Why ``path`` must not be a run's output directory (which a run fills, and whose leftovers it removes):
    the file-system root, the home directory, or the current directory or one of its ancestors (``.``,
    ``..``, ``../..``). None when it is fine."""
    real = Path(path).expanduser().resolve()
    if real == Path(real.anchor):
        return f"{str(path)!r} is the file-system root"
    if real == Path.home().resolve():
        return f"{str(path)!r} is the home directory"
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        return (
            f"{str(path)!r} is the current directory"
            + ("" if real == cwd else " or one of its parents")
            + f" ({real}); name a directory of its own, e.g. runs/<name>"
        )
    return None


def unwritable_reason(path: str | Path) -> str | None:
    """Why directory ``path`` cannot be created or written, found before any work: a parent that is a file, a
    read-only file system, no write permission. None when it can (as far as can be told without writing)."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():  # the nearest existing ancestor is where the first write happens
        if probe.parent == probe:
            break
        if probe.is_symlink():
            return f"{str(probe)!r} is a dangling symbolic link"
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return (
            f"{str(probe)!r} is a file, not a directory"
            if probe == path
            else f"its parent {str(probe)!r} is a file, not a directory"
        )
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{str(probe)!r} is on a read-only file system"
    except (OSError, AttributeError):  # no statvfs (Windows)
        pass
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{str(probe)!r} is not writable by this user"
    return None


def symlinks_in(directory: str | Path) -> list[str]:
    """Symbolic links directly inside ``directory`` (a run never writes through one: it would change files
    outside the directory)."""
    try:
        return sorted(c.name for c in Path(directory).iterdir() if c.is_symlink())
    except OSError:
        return []
