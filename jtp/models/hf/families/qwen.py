"""Qwen2 and Qwen3 (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``): Llama with q/k/v biases
(Qwen2) or a per-head RMSNorm of q and k (Qwen3), and a window on the last layers.

- tensors: ``self_attn.{q,k,v}_proj.bias`` (:data:`QKV_BIAS`) and ``self_attn.{q,k}_norm.
  weight`` (:data:`QK_NORM`: ``(E,)`` scales, RoPE-permuted like q and k, since they scale
  each feature of a head before the rotation; Gemma 3's q/k norms are named alike);
- config.json: the window applies only with ``use_sliding_window`` and, without
  ``layer_types``, from layer ``max_window_layers`` on (:mod:`jtp.models.hf.layer_types`);
  Qwen3's ``head_dim`` defaults to 128, and Qwen2's config class has no ``head_dim`` field
  (a derived config.json writes one only where ``hidden_size // num_attention_heads`` is
  not it).

Nothing of Qwen's is refused beyond the generic refusals.
"""

from __future__ import annotations

from jtp.errors import InputError
from jtp.models.hf import names
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.names import Row, TensorMap
from jtp.models.llama import LlamaConfig

ARCHITECTURES = {
    "Qwen2ForCausalLM": Architecture(
        "qwen2",
        True,
        False,
        32768,
        sliding_window=4096,
        sliding_needs_flag=True,
        window_layers="max_window_layers",
        head_dim_field=False,
    ),
    "Qwen3ForCausalLM": Architecture(
        "qwen3",
        False,
        True,
        32768,
        128,
        sliding_window=4096,
        sliding_needs_flag=True,
        window_layers="max_window_layers",
    ),
}

QKV_BIAS: tuple[Row, ...] = (  # Qwen2
    ("attention.wq.bias", "self_attn.q_proj.bias", False, True),
    ("attention.wk.bias", "self_attn.k_proj.bias", False, True),
    ("attention.wv.bias", "self_attn.v_proj.bias", False, False),
)
QK_NORM: tuple[Row, ...] = (  # Qwen3: (E,) scales, in the same within-head order as q and k
    ("attention.q_norm.scale", "self_attn.q_norm.weight", False, True),
    ("attention.k_norm.scale", "self_attn.k_norm.weight", False, True),
)


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Llama's tensors, with the biases and norms ``config`` has."""
    extra = (QKV_BIAS if config.qkv_bias else ()) + (QK_NORM if config.qk_norm else ())
    return names.tensor_map(config, names.BLOCK + extra)


def claim(config: LlamaConfig) -> str | None:
    """Qwen3 for q/k norms, Qwen2 for q/k/v biases; no architecture has both."""
    if config.qkv_bias and config.qk_norm:
        raise InputError("no supported HF architecture has both q/k/v biases and q/k norms")
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if config.qkv_bias else None
