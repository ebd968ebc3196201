"""The RoPE fields of a Hugging Face ``config.json``, both spellings, as jtp's RoPE.

The hub's files put ``rope_theta`` and ``rope_scaling`` at top level, transformers 5.x writes
``rope_parameters`` (with ``rope_theta`` inside), and Gemma 3 has one RoPE per layer type:
``rope_parameters`` nested under ``"full_attention"`` / ``"sliding_attention"``, or the hub's
``rope_theta`` + ``rope_scaling`` (global layers) and ``rope_local_base_freq`` (sliding
ones; :func:`jtp.models.hf.families.gemma.gemma3_rope`). jtp computes the ``default``,
``llama3`` and ``linear`` types on every rotated feature; anything else is a ``ValueError``
naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.hf.fields import positive_float
from jtp.models.rope import LinearRopeScaling, Llama3RopeScaling, RopeScaling

ROPE_TYPES = ("default", "llama3", "linear")  # HF rope types jtp computes
_DEFAULT_THETA = 10000.0  # transformers' default_theta
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope(
    hf: Mapping[str, Any], max_position_embeddings: int, field: str | None = None
) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling or None)`` from either spelling of the RoPE fields (``field``:
    how an error names them; default the spelling read)."""
    params = hf.get("rope_parameters")
    if params is not None and any(isinstance(v, Mapping) for v in params.values()):
        raise InputError(
            "config.json: rope_parameters is nested by layer type; of the architectures jtp "
            "loads only Gemma 3 has one RoPE per layer type"
        )
    field = field or ("rope_parameters" if params else "rope_scaling")
    params = dict(params or hf.get("rope_scaling") or {})
    theta = positive_float(params, "rope_theta", positive_float(hf, "rope_theta", _DEFAULT_THETA))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise InputError(
            f"config.json: {field}.rope_type={kind!r} is not supported; jtp computes "
            f"{', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise InputError(
            f"config.json: partial_rotary_factor={partial!r} is not supported; jtp rotates "
            "every feature of a head"
        )
    if kind == "default":
        return theta, None
    if kind == "linear":
        if "factor" not in params:
            raise InputError(f"config.json: {field} of rope_type 'linear' lacks 'factor'")
        return theta, LinearRopeScaling(float(params["factor"]))
    params.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise InputError(f"config.json: {field} of rope_type 'llama3' lacks {missing}")
    return theta, Llama3RopeScaling(**{k: params[k] for k in _LLAMA3_KEYS})


def rope_parameters(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` of one RoPE (the inverse of :func:`rope`)."""
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if isinstance(scaling, LinearRopeScaling):
        out.update(rope_type="linear", factor=scaling.factor)
    elif scaling is not None:
        out.update(rope_type="llama3", **dataclasses.asdict(scaling))
    return out
