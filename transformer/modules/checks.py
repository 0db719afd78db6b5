"""Checks of the numeric fields of module and model configs, shared so every message reads alike.

Each raises a ValueError naming the field and what is allowed, so that a bad value fails when
the config or module is made, not as an XLA error (a negative head_dim) or a silently wrong
model (a dropout rate above 1, a negative LayerNorm epsilon) later.
"""

import numbers


def _is_int(value):
    # bool is an int to Python, but True as a width is a typo, not a choice.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name, value, *, allow_none=False):
    """`value` is an int >= 1 (or None when `allow_none`)."""
    if allow_none and value is None:
        return
    if not _is_int(value) or value < 1:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}; got {value!r}.")


def check_rate(name, value):
    """`value` is a dropout rate: a number in [0, 1)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}.")


def check_positive_number(name, value):
    """`value` is a number > 0 (a LayerNorm epsilon, a RoPE base)."""
    if not _is_real(value) or not value > 0.0:
        raise ValueError(f"{name} must be a number > 0; got {value!r}.")
