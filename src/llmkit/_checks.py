"""Checks of user settings shared across llmkit."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number: an int or float, not a bool, not NaN (infinity is one).

    Examples:
        >>> is_number(2.0), is_number(True), is_number(float("nan")), is_number("2")
        (True, False, False, False)
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
