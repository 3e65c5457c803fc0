"""Type checks shared by every validator (configs, recipes, adapter files): a bool is not an int here."""

from __future__ import annotations

import math


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
