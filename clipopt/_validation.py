"""Argument checks shared by every public constructor.

Messages follow one pattern, ``"<name> must be <constraint>, got <value!r>"``, so a user
always sees which parameter was wrong and what was passed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Schedule",
    "check_bool",
    "check_choice",
    "check_foreach",
    "check_int",
    "check_norm_type",
    "check_range",
    "check_schedule",
    "check_threshold",
    "threshold_at",
]

#: A threshold: a number, or a function of the step count returning one.
Schedule = float | Callable[[int], float]


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


def check_schedule(name: str, value: Any, *, allow_inf: bool = True) -> Schedule:
    """Return a threshold or a schedule (a callable of the step count) after checking it.

    Numbers are checked as by :func:`check_threshold`; a callable is checked each time
    :func:`threshold_at` evaluates it.

    Raises:
        TypeError: ``value`` is neither a real number nor callable.
        ValueError: ``value`` is a number that is NaN or <= 0.
    """
    if callable(value) and not isinstance(value, numbers.Real):
        return value  # type: ignore[no-any-return]
    return check_threshold(name, value, allow_inf=allow_inf)


def threshold_at(name: str, value: Schedule, step: int) -> float:
    """Return the threshold at ``step``, evaluating a schedule on the host.

    Raises:
        TypeError, ValueError: A schedule returned something that is not a valid
            threshold; the message names the parameter and the step.
    """
    if callable(value):
        return check_threshold(f"{name}({step})", value(step))
    return value


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` after checking it is an int (not a bool) >= ``minimum``.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value`` < ``minimum``.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float after checking it lies in the given interval.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN or outside the interval.
    """
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if math.isnan(number) or below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` after checking it is one of ``choices``.

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(map(repr, choices))
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
