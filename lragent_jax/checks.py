"""Validators for values users hand in (counts, finite numbers): one clear ValueError each.

Shared by the Python API (Session, SamplingParams) and the scripts, so `generate(n=2.5)`
and `--temperature inf` are refused with the same rule everywhere.
"""

from __future__ import annotations

import math
import numbers


def count(value, what: str, minimum: int = 1) -> int:
    """An integer >= minimum (Python or numpy int; never a bool, float or string), as int.

    2.5 tokens has no meaning, and int(2.5) == 2 would silently do less than asked.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def finite_number(value, what: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open), as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if low is not None and (x <= low if low_open else x < low):
        raise ValueError(f"{what} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and x > high:
        raise ValueError(f"{what} must be <= {high}, got {value!r}")
    return x
