"""Typed reads of ``config.json`` fields: a wrong type or range is a one-line error naming the
field, never a coercion (``"hidden_size": "32"`` was read as 32, ``"num_hidden_layers": 2.5``
as 2, ``"rms_norm_eps": -1`` compiled and stepped into NaN)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError

_MISSING = object()


def _get(hf: Mapping[str, Any], field: str, default: Any) -> Any:
    value = hf.get(field)
    if value is None:
        if default is _MISSING:
            raise InputError(f"config.json: field {field!r} is missing")
        return default
    return value


def positive_int(hf: Mapping[str, Any], field: str, default: Any = _MISSING) -> Any:
    """``hf[field]`` as an int >= 1 (a JSON integer, not a string, float or bool)."""
    value = _get(hf, field, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"config.json: {field}={value!r} must be an integer")
    if value < 1:
        raise InputError(f"config.json: {field}={value!r} must be >= 1")
    return value


def positive_float(hf: Mapping[str, Any], field: str, default: Any = _MISSING) -> Any:
    """``hf[field]`` as a finite float > 0 (a JSON number, not a string or bool)."""
    value = _get(hf, field, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"config.json: {field}={value!r} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"config.json: {field}={value!r} must be a finite number > 0")
    return float(value)
