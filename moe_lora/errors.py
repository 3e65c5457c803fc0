"""Error types. All are ValueError subclasses so that callers can catch bad input in one place."""

from __future__ import annotations

import difflib

#: A problem line longer than this is cut (a value quoted whole could be megabytes).
MAX_PROBLEM_CHARS = 2000


class ConfigError(ValueError):
    """One or more invalid settings. ``problems`` lists each as 'field: value ... (allowed ...)'."""

    def __init__(self, problems: list[str], what: str = "MoELoRAConfig"):
        self.problems = [p if len(p) <= MAX_PROBLEM_CHARS else p[: MAX_PROBLEM_CHARS - 3] + "..." for p in problems]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} ({len(self.problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}")


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class RunError(RuntimeError):
    """A run that cannot go on, with a message that says what happened and what to do: the commands print it
    without a traceback and exit with ``exit_code`` (moe_lora/cli.py, training/train.py)."""

    exit_code = 1
