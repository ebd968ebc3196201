"""The error of a user's mistake, told apart from a bug.

A program (``python -m jtp.train`` and the others) prints an :class:`InputError` as one line
naming the flag, field or path to fix and exits 2, without a traceback; any other exception
is a bug or an environment failure and keeps its traceback. It is a ``ValueError``, so code
that caught those still catches these.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class InputError(ValueError):
    """A bad input (flag, config field, path, dataset, prompt): the message says what to fix."""


def check_fields(config: Any) -> None:
    """Check a dataclass's values against its fields' metadata, where it enters: every float
    finite (``--lr nan`` compiled, stepped once and ended in NaN with advice about the
    learning rate), ``{"min": x}`` (>= x) and ``{"above": x}`` (> x). Raises
    :class:`InputError` naming the field and its flag."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = f"{field.name}={value!r} (--{field.name.replace('_', '-')})"
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{name}: must be a finite number")
        low, above = field.metadata.get("min"), field.metadata.get("above")
        if low is not None and value < low:
            raise InputError(f"{name}: must be >= {low}")
        if above is not None and value <= above:
            raise InputError(f"{name}: must be > {above}")
