"""Write a report directory: report.json, the PNG plots and index.html, committed as one directory.

Everything is written into a hidden temporary directory beside ``out_dir`` and swapped onto it at the end
(moe_lora/atomic_dir.py): a plot or a page that fails halfway (a label, a full disk, a kill) leaves the previous
report, or nothing, never a half-written one. ``out_dir`` must be new or a report directory (only the files
below): a directory with other files, a symbolic link, or symbolic links inside it are refused before any work
(a link would be replaced, and a run never writes through one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic_dir import commit_dir, new_temp_dir, publish_modes, recover
from ..paths import dangerous_output_dir, symlinks_in, unwritable_reason

#: The files of a report directory (plots.write_plots writes the PNGs, page.write_index the page).
REPORT_FILES = (
    "report.json",
    "index.html",
    "load_heatmap.png",
    "cv_entropy.png",
    "coactivation.png",
    "load_by_task.png",
)


def report_dir_problem(out_dir: str | Path, flag: str = "out_dir") -> str | None:
    """Why ``out_dir`` cannot take a report (see the module docstring), or None."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        return f"{flag}: {str(out_dir)!r} exists and is not a directory"
    why = dangerous_output_dir(out_dir) or unwritable_reason(out_dir)
    if why:
        return f"{flag}: {why}"
    if out_dir.is_symlink():
        return (
            f"{flag}: {str(out_dir)!r} is a symbolic link (to {out_dir.readlink()}); the report directory is "
            "replaced as a whole, give the real directory"
        )
    if not out_dir.is_dir():
        return None
    links = symlinks_in(out_dir)
    if links:
        return (
            f"{flag}: {str(out_dir)!r} holds symbolic links ({', '.join(links[:5])}); a report never writes "
            "through a link (it could overwrite files outside the directory): remove them or use another "
            "directory"
        )
    foreign = sorted(c.name for c in out_dir.iterdir() if c.name not in REPORT_FILES)
    if foreign:
        return (
            f"{flag}: {str(out_dir)!r} holds files that are not part of a report ({', '.join(foreign[:5])}); "
            "write the report to a new or empty directory"
        )
    return None


def write_report_dir(report: dict, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Validate ``report`` and write it with its plots and page as directory ``out_dir`` (atomically; see the
    module docstring). Returns {"report": path, "index": path, <plot key>: path, ...}."""
    from .page import write_index
    from .plots import write_plots
    from .report import validate_report, write_json

    problems = validate_report(report)
    if problems:
        raise ValueError("report does not follow its schema:\n  " + "\n  ".join(problems))
    problem = report_dir_problem(out_dir)
    if problem:
        raise ValueError(problem)
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir, ("report.json",))
    tmp = new_temp_dir(out_dir)
    try:
        write_json(tmp / "report.json", report)
        files = write_plots(report, tmp) if plots else {}
        write_index(report, files, tmp)
        publish_modes(tmp)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "report": out_dir / "report.json",
        "index": out_dir / "index.html",
        **{k: out_dir / v for k, v in files.items()},
    }
