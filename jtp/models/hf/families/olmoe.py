"""OLMoE (``OlmoeForCausalLM``): Llama with a mixture of experts in every layer and an
RMSNorm of the whole q and k projections.

- q/k norms: ``OlmoeAttention`` norms ``q_proj``'s whole output (``hidden_size`` features,
  one scale each) and ``k_proj``'s (``head_dim * num_key_value_heads``) *before* the split
  into heads (``self.q_norm(self.q_proj(hidden_states))``), unlike Qwen3's per-head norms:
  jtp's ``qk_norm_scope="all"``. The scales are RoPE-permuted within each head, as q and
  k's rows.
- config.json: ``num_experts`` (default 64), ``num_experts_per_tok`` (8),
  ``norm_topk_prob`` (false), ``router_aux_loss_coef`` (0.01); each expert is
  ``intermediate_size`` wide; the gating is ``"softmax_topk"``. No sliding window.
- tensors: ``mlp.gate.weight``, ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
  ``self_attn.{q,k}_norm.weight`` ``(H * E,)`` / ``(K * E,)``.
- refused: ``clip_qkv`` (q, k, v clamped to +-clip_qkv; jtp does not clamp); a
  ``head_dim`` other than ``hidden_size / num_attention_heads`` (the q norm is
  ``hidden_size`` wide); a ``sliding_window`` (transformers' mask ignores it, its flash
  kernels would not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.hf import names
from jtp.models.hf.families import experts
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.names import TensorMap
from jtp.models.llama import LlamaConfig

ARCHITECTURE = "OlmoeForCausalLM"
ARCHITECTURES = {
    ARCHITECTURE: Architecture(
        "olmoe", False, True, 4096, rms_norm_eps=1e-5, window_layers="none", head_dim_field=False
    ),
}
DEFAULTS = {"num_experts": 64, "num_experts_per_tok": 8, "router_aux_loss_coef": 0.01}
QK_NORM = (  # (H * E,) and (K * E,): every head's features, RoPE-permuted within heads
    ("attention.q_norm.scale", "self_attn.q_norm.weight", False, True),
    ("attention.k_norm.scale", "self_attn.k_norm.weight", False, True),
)


def check_config(hf: Mapping[str, Any], architecture: str) -> None:
    """Refuse ``clip_qkv``, another ``head_dim``, a window (the module docstring says why)."""
    if hf.get("clip_qkv") is not None:
        raise InputError(
            f"config.json: clip_qkv={hf['clip_qkv']!r} is not supported: OLMoE clamps q, k and "
            "v to +-clip_qkv, and jtp's attention does not clamp"
        )
    head_dim, dim, heads = hf.get("head_dim"), hf.get("hidden_size"), hf.get("num_attention_heads")
    if (
        head_dim is not None
        and isinstance(dim, int)
        and isinstance(heads, int)
        and head_dim * heads != dim
    ):
        raise InputError(
            f"config.json: head_dim={head_dim!r} is not supported for {ARCHITECTURE}: its q_norm "
            "is hidden_size wide, so head_dim must be hidden_size / num_attention_heads"
        )
    if hf.get("sliding_window") is not None:
        raise InputError(
            f"config.json: sliding_window={hf['sliding_window']!r} is not supported for "
            f"{ARCHITECTURE}: transformers' mask has no window there (its flash kernels would "
            "apply one)"
        )


def config_fields(hf: Mapping[str, Any], architecture: str, max_positions: int) -> dict[str, Any]:
    """The router; whole-projection q/k norms."""
    fields = experts.router_fields(hf, ("num_experts", "num_local_experts"), DEFAULTS)
    return {**fields, "gating": "softmax_topk", "qk_norm_scope": "all"}


def hf_fields(config: LlamaConfig, architecture: str) -> dict[str, Any]:
    """The router's fields; ``intermediate_size`` is the experts' width."""
    return {
        **experts.moe_hf_fields(config, "num_experts"),
        "norm_topk_prob": config.norm_topk_prob,
        "intermediate_size": config.moe_ffn_hidden or config.ffn_hidden,
        "clip_qkv": None,
    }


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Llama's attention rows with the whole-projection q/k norms, experts in every layer."""
    return names.tensor_map(config, names.BLOCK[:6] + QK_NORM + experts.sparse_rows(config))


def claim(config: LlamaConfig) -> str | None:
    """A softmax-top-k MoE model with whole-projection q/k norms."""
    if config.n_experts and config.gating == "softmax_topk" and config.qk_norm:
        return ARCHITECTURE if config.qk_norm_scope == "all" else None
    return None
