"""The tests every setting's check uses: a whole number, a finite real number, a seed.

One definition for the command line, the Python API and hand-edited configs: ``True`` and
``False`` are neither (a flag typed where a count was meant); numpy's integers and floats are.
Pure Python, so the model core imports it without the data stack.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def is_whole(x) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_finite(x) -> bool:
    """A real number (int or float, Python's or numpy's), not a bool, not NaN or infinite."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


MAX_SEED = 2**32 - 1  # numpy's legacy and torch's generators both take seeds up to here


def check_seed(seed) -> None:
    """A ValueError unless ``seed`` is a whole number from 0 to ``MAX_SEED``."""
    if not (is_whole(seed) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed {seed!r}: a whole number from 0 to {MAX_SEED}")


def json_safe(x):
    """``x`` with every NaN or infinite float as None: JSON has no such numbers, and a browser's
    ``JSON.parse`` stops at the first ``NaN`` that ``json.dumps`` writes by default."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# Counts per cell an expression is scaled to: float32 overflows to inf above the top and
# underflows to 0 far below the floor (1e-320 made every imputed value 0.0); scvi-tools' own
# normalised scale is 1.
LIBRARY_SIZE_RANGE = (1e-6, 1e9)


def check_library_size(value) -> None:
    """A ValueError unless ``value`` is a number in ``LIBRARY_SIZE_RANGE``."""
    low, high = LIBRARY_SIZE_RANGE
    if not (is_finite(value) and low <= value <= high):
        raise ValueError(
            f"library_size={value}: counts per this many, a number in [{low:g}, {high:g}]"
        )
