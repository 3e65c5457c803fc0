"""Write a report directory: report.json, the PNG plots and index.html."""

from __future__ import annotations

from pathlib import Path

from .page import write_index
from .plots import write_plots
from .report import validate_report, write_json


def write_report_dir(report: dict, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Validate ``report`` and write it with its plots and page into ``out_dir`` (created if needed).

    Returns {"report": path, "index": path, <plot key>: path, ...}.
    """
    problems = validate_report(report)
    if problems:
        raise ValueError("report does not follow its schema:\n  " + "\n  ".join(problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    files = write_plots(report, out_dir) if plots else {}
    index = write_index(report, files, out_dir)
    return {"report": out_dir / "report.json", "index": index, **{k: out_dir / v for k, v in files.items()}}
