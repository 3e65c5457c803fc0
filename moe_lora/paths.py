"""Output paths that stay inside their output directory.

Everything a run writes goes under one directory the user chose (``output_dir``, ``--out``). ``inside(root,
*parts)`` joins the parts and refuses a result that leaves ``root``, whether by ``..``, an absolute part or a
symbolic link met on the way (``root/checkpoints -> /etc``): a shared machine's stale link or a hand-made
name can then never make a run write or delete elsewhere.
"""

from __future__ import annotations

from pathlib import Path


def inside(root: str | Path, *parts: str | Path) -> Path:
    """``root / parts...`` (not resolved: the path as the user would write it), after checking that it resolves
    to ``root`` itself or a path under it. Raises ValueError naming both paths otherwise."""
    root = Path(root)
    path = root.joinpath(*parts)
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise ValueError(f"output path {str(path)!r} resolves to {str(real)!r}, outside the output directory "
                         f"{str(real_root)!r} (a '..' part, an absolute part or a symbolic link); refusing to write")
    return path
