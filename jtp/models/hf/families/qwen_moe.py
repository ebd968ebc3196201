"""Qwen2-MoE and Qwen3-MoE (``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``): Qwen2's
attention (q/k/v biases) or Qwen3's (per-head q/k norms) with a mixture of experts in the
sparse layers, and, in Qwen2-MoE, a shared expert every token goes through.

- config.json: ``num_experts``, ``num_experts_per_tok``, ``norm_topk_prob``,
  ``moe_intermediate_size`` (each expert's width, jtp's ``moe_ffn_hidden``;
  ``intermediate_size`` is the dense layers'), ``router_aux_loss_coef``; the gating is
  ``"softmax_topk"``. Which layers are sparse: ``decoder_sparse_step`` and
  ``mlp_only_layers`` (:func:`jtp.models.hf.families.experts.qwen_moe_layers`), as jtp's
  ``moe_layers``: a mix of dense and sparse layers is built unrolled
  (``scan_layers=False``). Qwen2-MoE: ``shared_expert_intermediate_size`` and
  ``qkv_bias`` (default true). Qwen3-MoE: ``head_dim`` where config.json gives one, and
  ``use_sliding_window`` puts ``sliding_window`` on every layer (its attention and mask
  ignore ``max_window_layers`` and ``layer_types``).
- tensors: ``mlp.gate.weight``, ``mlp.experts.{e}.{gate,up,down}_proj.weight``;
  Qwen2-MoE's ``mlp.shared_expert.{gate,up,down}_proj.weight`` and
  ``mlp.shared_expert_gate.weight`` ``(1, D)``; a dense layer's ``mlp.*`` are Llama's.
- refused: Qwen2-MoE's ``use_sliding_window`` (transformers 5.25 slides only the
  even-numbered layers below ``max_window_layers``, a placement jtp's loader does not
  compute).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jtp.models.hf import names
from jtp.models.hf.families import experts
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.families.qwen import QK_NORM, QKV_BIAS
from jtp.models.hf.fields import positive_int
from jtp.models.hf.names import TensorMap
from jtp.models.llama import LlamaConfig

QWEN2_MOE, QWEN3_MOE = "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
ARCHITECTURES = {
    QWEN2_MOE: Architecture(
        "qwen2_moe", True, False, 32768, window_layers="none", head_dim_field=False
    ),
    QWEN3_MOE: Architecture(
        "qwen3_moe",
        False,
        True,
        32768,
        sliding_window=4096,
        sliding_needs_flag=True,
        head_dim_field=False,
    ),
}
# Where config.json says E: Qwen3MoeConfig aliases num_experts (the hub's) to
# num_local_experts (what transformers 5.25 writes); Qwen2MoeConfig reads num_experts only.
EXPERTS_FIELDS = {QWEN2_MOE: ("num_experts",), QWEN3_MOE: ("num_local_experts", "num_experts")}
DEFAULTS = {
    QWEN2_MOE: {
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "router_aux_loss_coef": 0.001,
    },
    QWEN3_MOE: {
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "router_aux_loss_coef": 0.001,
    },
}


def check_config(hf: Mapping[str, Any], architecture: str) -> None:
    """Qwen2-MoE's window is refused (the module docstring says why)."""
    if architecture == QWEN2_MOE:
        experts.refuse_window(
            hf,
            architecture,
            "transformers slides only the even-numbered layers below max_window_layers there",
        )


def config_fields(hf: Mapping[str, Any], architecture: str, max_positions: int) -> dict[str, Any]:
    """The router, the experts' width, the sparse layers; Qwen2-MoE's shared expert and biases."""
    defaults = DEFAULTS[architecture]
    fields = experts.router_fields(hf, EXPERTS_FIELDS[architecture], defaults)
    fields.update(
        gating="softmax_topk",
        moe_ffn_hidden=positive_int(hf, "moe_intermediate_size", defaults["moe_intermediate_size"]),
        moe_layers=experts.qwen_moe_layers(hf, positive_int(hf, "num_hidden_layers")),
    )
    if fields["moe_layers"] is not None:  # dense and sparse layers: not one scanned body
        fields["scan_layers"] = False  # how jtp runs it (describes() ignores it): the config
        # must build; load_pretrained(scan_layers=True) then says to unroll
    if architecture == QWEN2_MOE:
        shared = "shared_expert_intermediate_size"
        fields["shared_expert_hidden"] = positive_int(hf, shared, defaults[shared])
        fields["qkv_bias"] = bool(hf.get("qkv_bias", True))  # Qwen2MoeConfig's field
    return fields


def hf_fields(config: LlamaConfig, architecture: str) -> dict[str, Any]:
    """The router, the experts' width, the sparse layers; Qwen2-MoE's shared expert and biases."""
    out = {
        **experts.moe_hf_fields(config, "num_experts"),
        **experts.qwen_layer_fields(config),
        "moe_intermediate_size": config.moe_ffn_hidden or config.ffn_hidden,
        "norm_topk_prob": config.norm_topk_prob,
    }
    if architecture == QWEN2_MOE:
        out.update(
            shared_expert_intermediate_size=config.shared_expert_hidden, qkv_bias=config.qkv_bias
        )
    return out


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Qwen's attention rows; each layer's feed-forward sparse or dense as ``moe_layers`` says."""
    attention = (
        names.BLOCK[:6]
        + (QKV_BIAS if config.qkv_bias else ())
        + (QK_NORM if config.qk_norm else ())
    )
    sparse, dense = attention + experts.sparse_rows(config), attention + names.BLOCK[6:]
    moe = config.layer_moe()
    return names.tensor_map(config, layer_rows=lambda i: sparse if moe[i] else dense)


def claim(config: LlamaConfig) -> str | None:
    """A softmax-top-k MoE model: Qwen3-MoE's with per-head q/k norms, Qwen2-MoE's with a
    shared expert or q/k/v biases."""
    if not config.n_experts or config.gating != "softmax_topk":
        return None
    if config.qk_norm and config.qk_norm_scope == "head":
        return QWEN3_MOE
    return QWEN2_MOE if config.shared_expert_hidden or config.qkv_bias else None
