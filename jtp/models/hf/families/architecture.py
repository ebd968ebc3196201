"""The row a family declares for each HF ``*ForCausalLM`` class: what it sets of jtp's
decoder, and transformers' defaults for the fields a ``config.json`` may omit.

Plain data, read by the generic code (:mod:`jtp.models.hf.config`, and the window placement
of :mod:`jtp.models.hf.layer_types`); what a family computes beyond such data (Gemma's
fields, Phi-3's fused tensors) is its module's own functions (:mod:`jtp.models.hf.families`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What one HF ``*ForCausalLM`` class adds to jtp's Llama, and its config defaults
    (transformers' own, used when config.json omits a field)."""

    model_type: str  # config.json "model_type"
    qkv_bias: bool  # q/k/v projections always carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm of q and k (Qwen3)
    max_position_embeddings: int  # transformers' default
    head_dim: int | None = None  # default when absent (Qwen3: 128); None: hidden / heads
    sliding_window: int | None = None  # default when absent (Mistral: 4096)
    sliding_needs_flag: bool = False  # the window applies only with use_sliding_window (Qwen)
    rms_norm_eps: float = 1e-6  # default when absent (Phi-3: 1e-5)
    # Which layers the window is on when config.json has no layer_types: "none" (no window
    # at all: Llama), "all" (layer_types ignored: Mistral), "max_window_layers" (Qwen: from
    # that layer on), "pattern" (Gemma: one global layer in every sliding_pattern(hf, arch)
    # of the family's module).
    window_layers: str = "all"
    tied: bool = False  # tie_word_embeddings' default
    # The config class has a head_dim field (Qwen2's has none: its attention takes
    # hidden_size // num_attention_heads unless config.json sets one).
    head_dim_field: bool = True
    # The activation is config.json's hidden_act, silu only (Gemma's is hidden_activation,
    # read and written by its module instead).
    hidden_act: bool = True
    # Its attention reads sliding_window even where no layer slides (Gemma): a derived
    # config.json then writes the default rather than null.
    window_always_read: bool = False
