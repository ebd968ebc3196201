"""Which layers of a Hugging Face model are sliding-window ones (``layer_types``).

transformers gives the window to every layer (Mistral, Phi-3: ``layer_types`` ignored), to
those ``layer_types`` names ``"sliding_attention"``, or, without ``layer_types``, to the
layers its config class assigns: Qwen from ``max_window_layers`` on, Gemma all but every
``sliding_pattern``-th (:mod:`jtp.models.hf.gemma`). jtp's ``LlamaConfig.sliding_layers``
holds the shortest pattern that repeats to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jtp.models.hf import gemma

LAYER_TYPES = ("sliding_attention", "full_attention")  # HF layer_types jtp computes
MAX_WINDOW_LAYERS = 28  # Qwen's max_window_layers default


def sliding_layers(
    hf: Mapping[str, Any], how: str, n_layers: int, gemma_version: int = 0
) -> tuple[bool, ...]:
    """Whether transformers makes each layer a sliding one: by ``layer_types``, or as the
    architecture assigns them without it (``how``: an ``Architecture.window_layers``)."""
    if how in ("none", "all"):  # Mistral's attention ignores layer_types
        return (how == "all",) * n_layers
    types = hf.get("layer_types")
    if types is not None:
        if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
            raise ValueError(
                f"config.json: layer_types={types!r} is not supported: jtp computes "
                f"{n_layers} (num_hidden_layers) entries among {LAYER_TYPES}"
            )
        return tuple(t == "sliding_attention" for t in types)
    if how == "max_window_layers":
        first = int(hf.get("max_window_layers", MAX_WINDOW_LAYERS))
        return tuple(i >= first for i in range(n_layers))
    every = gemma.sliding_pattern(hf, gemma_version)
    return tuple((i + 1) % every != 0 for i in range(n_layers))


def pattern_of(flags: tuple[bool, ...]) -> tuple[bool, ...] | None:
    """``flags`` as :class:`LlamaConfig`'s ``sliding_layers``: its shortest repeating
    pattern (Gemma 2's (True, False)), None when every layer slides."""
    if all(flags):
        return None
    period = next(
        p for p in range(1, len(flags) + 1)
        if all(flags[i] == flags[i % p] for i in range(len(flags)))
    )  # fmt: skip
    return flags[:period]
