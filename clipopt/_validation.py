"""Argument checks shared by every public constructor.

Messages follow one pattern, ``"<name> must be <constraint>, got <value!r>"``, so a user
always sees which parameter was wrong and what was passed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_bool", "check_foreach", "check_norm_type", "check_threshold"]


def _is_real(value: Any) -> bool:
    # bool is an int subclass; True as a threshold is always a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_threshold(name: str, value: Any, *, allow_inf: bool = True) -> float:
    """Return ``value`` as a float after checking it is a real number > 0.

    Args:
        name: Parameter name used in the error message.
        value: The value to check.
        allow_inf: Whether ``math.inf`` ("never clip") is accepted.

    Returns:
        The value as a Python float.

    Raises:
        TypeError: ``value`` is not a real number (bools included).
        ValueError: ``value`` is NaN, <= 0, or infinite when ``allow_inf`` is False.
    """
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if number <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if math.isinf(number) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def check_norm_type(value: Any) -> float:
    """Return ``norm_type`` as a float: any p > 0, or ``math.inf``.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN or <= 0.
    """
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    return check_threshold("norm_type", value, allow_inf=True)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` after checking it is a bool.

    Raises:
        TypeError: ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_foreach(value: Any) -> bool | None:
    """Return ``foreach`` after checking it is ``None``, True or False.

    Raises:
        TypeError: ``value`` is neither None nor a bool.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"foreach must be None or a bool, got {value!r}")
    return value
