"""Which layers of a Hugging Face model are sliding-window ones (``layer_types``).

transformers gives the window to every layer (Mistral, Phi-3: ``layer_types`` ignored), to
those ``layer_types`` names ``"sliding_attention"``, or, without ``layer_types``, to the
layers its config class assigns: Qwen from ``max_window_layers`` on, Gemma all but every
``sliding_pattern``-th (:func:`jtp.models.hf.families.gemma.sliding_pattern`). jtp's
``LlamaConfig.sliding_layers`` holds the shortest pattern that repeats to them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.llama import LlamaConfig

LAYER_TYPES = ("sliding_attention", "full_attention")  # HF layer_types jtp computes
MAX_WINDOW_LAYERS = 28  # Qwen's max_window_layers default


def sliding_layers(
    hf: Mapping[str, Any],
    how: str,
    n_layers: int,
    pattern: Callable[[], int] | None = None,
) -> tuple[bool, ...]:
    """Whether transformers makes each layer a sliding one: by ``layer_types``, or as the
    architecture assigns them without it (``how``: an ``Architecture.window_layers``;
    ``pattern``: for "pattern", every how many layers one is global, asked only then)."""
    if how in ("none", "all"):  # Mistral's attention ignores layer_types
        return (how == "all",) * n_layers
    types = hf.get("layer_types")
    if types is not None:
        if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
            raise InputError(
                f"config.json: layer_types={types!r} is not supported: jtp computes "
                f"{n_layers} (num_hidden_layers) entries among {LAYER_TYPES}"
            )
        return tuple(t == "sliding_attention" for t in types)
    if how == "max_window_layers":
        first = int(hf.get("max_window_layers", MAX_WINDOW_LAYERS))
        return tuple(i >= first for i in range(n_layers))
    every = pattern()
    return tuple((i + 1) % every != 0 for i in range(n_layers))


def pattern_of(flags: tuple[bool, ...]) -> tuple[bool, ...] | None:
    """``flags`` as :class:`LlamaConfig`'s ``sliding_layers``: its shortest repeating
    pattern (Gemma 2's (True, False)), None when every layer slides."""
    if all(flags):
        return None
    period = next(
        p
        for p in range(1, len(flags) + 1)
        if all(flags[i] == flags[i % p] for i in range(len(flags)))
    )
    return flags[:period]


def window_fields(
    config: LlamaConfig, how: str, needs_flag: bool, unused_window: int | None
) -> dict[str, Any]:
    """The window fields of a ``config.json`` derived from ``config`` (``how``: the
    architecture's ``window_layers``; ``needs_flag``: Qwen's ``use_sliding_window``):
    those from which transformers builds exactly ``config``'s layers, parsed as the
    source's config was.

    transformers 5 gives a sliding cache and mask to every ``layer_types`` entry
    "sliding_attention", whatever the window (a null one fails the first forward), so a
    model without a window lists only "full_attention" layers. Qwen's window applies only
    with ``use_sliding_window`` (written either way), and ``max_window_layers`` is written
    where the sliding layers are the last ones, as Qwen's configs say it (without a window
    it is left to its default, as transformers' own config leaves it). Gemma's attention
    reads a window even where no layer slides: ``unused_window`` (its default) then.
    """
    window = config.sliding_window
    kinds = config.layer_sliding()  # every layer when sliding_layers is None
    if window is None and config.local_rope_theta is None:
        kinds = (False,) * config.n_layers  # no window, no second RoPE: no sliding layer
    out: dict[str, Any] = {}
    if how != "none":
        out["sliding_window"] = unused_window if window is None else window
    if needs_flag:
        out["use_sliding_window"] = window is not None
        first = kinds.index(True) if True in kinds else len(kinds)
        # Qwen3-MoE's window is on every layer: its config has no max_window_layers
        if how == "max_window_layers" and window is not None and all(kinds[first:]):
            out["max_window_layers"] = first
    if how not in ("none", "all"):
        out["layer_types"] = [LAYER_TYPES[0] if k else LAYER_TYPES[1] for k in kinds]
    return out
