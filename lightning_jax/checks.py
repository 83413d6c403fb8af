"""Argument checks shared by the op, the model and training configs, and the CLI.

Every failed check raises `ArgumentError` (a `ValueError`) or `ArgumentTypeError` (also a
`TypeError`, for values of the wrong kind), whose `field` names what was wrong and whose message
reads ``field: got <value>, expected <what>``. Nested configs prefix the field with `under`
(``optim.lr``, then ``config.optim.lr``) instead of editing message text, so the CLI can print the
error as one line.

Each `check_*` returns the value (converted where it says so), so callers write
``lr = check_float("lr", lr, low=0.0, open_low=True)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np


class ArgumentError(ValueError):
    """A bad argument or config field. `field` is its name (a dotted path for nested configs),
    `detail` the rest of the message (``got ..., expected ...``)."""

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(f"{field}: {detail}")

    def __reduce__(self):  # picklable across processes (the original args are not the message)
        return (type(self), (self.field, self.detail))

    def under(self, prefix: str) -> "ArgumentError":
        """The same error with its field inside `prefix` (``lr`` under ``optim`` -> ``optim.lr``)."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return type(self)(field, self.detail)


class ArgumentTypeError(ArgumentError, TypeError):
    """A value of the wrong kind (a string where a bool belongs, a traced value where a Python
    float belongs). Caught by `except TypeError` and by `except ValueError` alike."""


def fail(field: str, value: Any, expected: str, *, kind: type[ArgumentError] = ArgumentError):
    """Raises ``kind(field, "got {value!r}, expected {expected}")``."""
    raise kind(field, f"got {value!r}, expected {expected}")


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def is_real(value) -> bool:
    """A Python or numpy int or float, not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def check_int(field: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) in [minimum, maximum]; returns it as a Python int."""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            expected = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            expected = f"an integer >= {minimum}"
        elif maximum is not None:
            expected = f"an integer <= {maximum}"
        else:
            expected = "an integer"
        fail(field, value, expected)
    return int(value)


def check_float(
    field: str,
    value,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """A finite real number (not a bool) in the interval; returns it as a Python float."""
    ok = is_real(value) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if low == -math.inf and high == math.inf:
            expected = "a finite number"
        elif low == 0 and open_low and high == math.inf:
            expected = "a positive finite number"
        else:
            expected = f"a finite number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        fail(field, value, expected)
    return float(value)


def check_bool(field: str, value) -> bool:
    """True or False (not 1, not "yes")."""
    if not isinstance(value, (bool, np.bool_)):
        fail(field, value, "True or False", kind=ArgumentTypeError)
    return bool(value)


def check_str(field: str, value) -> str:
    if not isinstance(value, str):
        fail(field, value, "a string", kind=ArgumentTypeError)
    return value


def check_choice(field: str, value, choices: Iterable):
    """One of `choices` (compared with ==)."""
    choices = list(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        fail(field, value, f"one of {choices}")
    return value


def check_power_of_two(field: str, value, *, allow_none: bool = False) -> int | None:
    """A positive power of two (1, 2, 4, ...), or None where allowed."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 1 or value & (value - 1):
        fail(field, value, "a positive power of two (16, 32, 64, ...)" + (" or None" if allow_none else ""))
    return int(value)


def check_instance(field: str, value, cls: type | tuple[type, ...], expected: str | None = None):
    if not isinstance(value, cls):
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise ArgumentTypeError(field, f"got {type(value).__name__}, expected {expected or names}")
    return value
