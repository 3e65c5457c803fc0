"""The error of an export that cannot be written exactly: raised before anything is written."""

from __future__ import annotations


class ExportRefused(ValueError):
    """``format`` cannot represent this model exactly. ``problems`` names each blocker; ``instead`` says which
    format (and options) would work."""

    def __init__(self, format: str, problems: list[str], instead: str):
        self.format, self.problems, self.instead = format, list(problems), instead
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"export --format {format}: refused, nothing was written ({len(self.problems)} "
            f"problem{'s' if len(self.problems) != 1 else ''}):\n{lines}\n  instead: {instead}"
        )
