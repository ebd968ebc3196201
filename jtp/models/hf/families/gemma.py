"""Gemma 2 and Gemma 3, text (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``): their
``config.json`` fields as :class:`~jtp.models.llama.LlamaConfig` fields and back, their four
norms per block, and the refusal of Gemma 3's multimodal model.

transformers 5.24's ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` on top of Llama:

- ``hidden_activation: "gelu_pytorch_tanh"``: GeGLU (``activation="gelu_tanh"``);
- ``Gemma*RMSNorm``: ``x / rms(x) * (1 + w)`` in float32 (``norm_offset``), q/k norms too
  (Gemma 3's, named as Qwen3's: :data:`jtp.models.hf.families.qwen.QK_NORM`);
- the embedding times ``sqrt(hidden_size)`` in the weights' dtype (``embed_scale``);
- four norms per block (``sandwich_norms``): ``input_layernorm`` before attention,
  ``post_attention_layernorm`` on attention's *output*, ``pre_feedforward_layernorm``
  before the MLP, ``post_feedforward_layernorm`` on its output. Llama's
  ``post_attention_layernorm`` is the pre-MLP norm, jtp's ``ffn_norm``: here that is
  ``pre_feedforward_layernorm``, and the two post-norms are ``post_attention_norm`` /
  ``post_ffn_norm`` (:func:`block_rows`);
- scores times ``query_pre_attn_scalar ** -0.5``;
- Gemma 2: ``attn_logit_softcapping`` (scores ``tanh(s / cap) * cap`` before the mask) and
  ``final_logit_softcapping`` (the logits alike). Gemma 3's attention stores
  ``attn_logit_softcapping`` and never applies it (5.24), so jtp does not either;
- ``layer_types``: sliding-window layers among global ones (defaults: Gemma 2 alternates
  from a sliding layer 0; Gemma 3 has five sliding layers to one global,
  ``sliding_window_pattern``: :func:`sliding_pattern`);
- Gemma 3's RoPE by layer type: ``rope_parameters`` nested under ``"sliding_attention"`` /
  ``"full_attention"`` (transformers 5), or the hub's ``rope_theta`` (global layers, with
  ``rope_scaling``) and ``rope_local_base_freq`` (sliding layers, never scaled).

Refused: another ``hidden_activation``, ``use_bidirectional_attention`` (the embedding
variants), and ``Gemma3ForConditionalGeneration`` (:data:`REFUSED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.hf import names
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.families.qwen import QK_NORM
from jtp.models.hf.names import Row, TensorMap
from jtp.models.hf.rope_config import rope, rope_parameters
from jtp.models.llama import LlamaConfig
from jtp.models.rope import RopeScaling

GEMMA2, GEMMA3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM"
ARCHITECTURES = {
    GEMMA2: Architecture(
        "gemma2",
        False,
        False,
        8192,
        256,
        sliding_window=4096,
        window_layers="pattern",
        tied=True,
        hidden_act=False,
        window_always_read=True,
    ),
    GEMMA3: Architecture(
        "gemma3_text",
        False,
        True,
        131072,
        256,
        sliding_window=4096,
        window_layers="pattern",
        tied=True,
        hidden_act=False,
        window_always_read=True,
    ),
}
# Known, and refused with the reason (not a text-only causal LM jtp computes).
REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "it is Gemma 3's multimodal model (a vision tower, text under text_config); jtp "
        "loads the text model, Gemma3ForCausalLM (model_type gemma3_text)"
    ),
}
ACTIVATION = "gelu_pytorch_tanh"  # transformers' name for jtp's "gelu_tanh"
FINAL_SOFTCAP = {2: 30.0, 3: None}  # final_logit_softcapping defaults
ATTN_SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping default
QUERY_PRE_ATTN_SCALAR = 256  # both configs' default
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma 3's
SLIDING_PATTERN = 6  # Gemma 3: layer i is global when (i + 1) % 6 == 0 (sliding_window_pattern)


def config_fields(hf: Mapping[str, Any], architecture: str, max_positions: int) -> dict[str, Any]:
    """The :class:`LlamaConfig` fields a Gemma config.json sets, windows aside (Gemma 3's
    RoPE included); a ``ValueError`` naming the field jtp would compute differently."""
    version = 3 if architecture == GEMMA3 else 2
    act = hf.get("hidden_activation") or ACTIVATION
    if act != ACTIVATION:
        raise ValueError(
            f"config.json: hidden_activation={act!r} is not supported: jtp's Gemma "
            f"feed-forward is GeGLU with {ACTIVATION!r}"
        )
    if hf.get("use_bidirectional_attention"):
        raise ValueError(
            "config.json: use_bidirectional_attention=True is not supported: jtp's attention "
            "is causal"
        )
    cap = hf.get("final_logit_softcapping", FINAL_SOFTCAP[version])
    attn_cap = hf.get("attn_logit_softcapping", ATTN_SOFTCAP) if version == 2 else None
    fields = dict(
        activation="gelu_tanh",
        norm_offset=True,
        embed_scale=True,
        sandwich_norms=True,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", QUERY_PRE_ATTN_SCALAR)),
        attn_softcap=None if attn_cap is None else float(attn_cap),
        final_softcap=None if cap is None else float(cap),
    )
    if version == 3:  # one RoPE per layer type, in place of the generic read
        theta, scaling, local = gemma3_rope(hf, max_positions)
        fields.update(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local)
    return fields


def sliding_pattern(hf: Mapping[str, Any], architecture: str) -> int:
    """Every how many layers one is global when config.json has no ``layer_types``."""
    if architecture == GEMMA2:  # Gemma2Config has no sliding_window_pattern: it alternates
        return 2
    return int(hf.get("sliding_window_pattern") or SLIDING_PATTERN)


def rope_parameters_by_type(hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Gemma 3's RoPE parameters of each layer type, ``{"full_attention": {...},
    "sliding_attention": {...}}`` (each with ``rope_type`` and ``rope_theta``), from either
    spelling, as ``Gemma3TextConfig.convert_rope_params_to_dict`` reads them."""
    params = hf.get("rope_parameters")
    if params is not None and not all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            "config.json: Gemma 3's rope_parameters must be nested by layer type "
            f"(full_attention, sliding_attention); got {dict(params)!r}"
        )
    out = {k: dict((params or {}).get(k) or {"rope_type": "default"}) for k in DEFAULT_THETA}
    if hf.get("rope_scaling"):  # the hub's scaling applies to the global layers
        out["full_attention"].update(hf["rope_scaling"])
    out["full_attention"].setdefault(
        "rope_theta", hf.get("rope_theta") or DEFAULT_THETA["full_attention"]
    )
    out["sliding_attention"].setdefault(
        "rope_theta", hf.get("rope_local_base_freq") or DEFAULT_THETA["sliding_attention"]
    )
    for params in out.values():
        params.setdefault("rope_type", params.pop("type", "default"))
    return out


def hf_fields(config: LlamaConfig, architecture: str) -> dict[str, Any]:
    """What a transformers-5 ``config.json`` of a Gemma says beyond Llama's (the window and
    layer types are the caller's); Gemma 3's ``rope_parameters``, one per layer type (the
    sliding layers' as the others' if unset)."""
    version = 3 if architecture == GEMMA3 else 2
    scalar = config.query_pre_attn_scalar or config.head_dim  # jtp's None is head_dim ** -0.5
    out = {
        "hidden_activation": ACTIVATION,
        "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
        "final_logit_softcapping": config.final_softcap,
        "attn_logit_softcapping": config.attn_softcap,
    }
    if version == 3:  # Gemma2Config has no such field
        out["use_bidirectional_attention"] = False
        full = rope_parameters(config.rope_theta, config.rope_scaling)
        local = config.local_rope_theta
        sliding = full if local is None else rope_parameters(local, None)
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": sliding}
    return out


def block_rows(rows: tuple[Row, ...]) -> tuple[Row, ...]:
    """Llama's per-block name rows (``(jtp, hf, transpose, rope-permuted)``) made Gemma's:
    ``ffn_norm`` is ``pre_feedforward_layernorm``, and the two output norms are added."""
    renamed = {"ffn_norm.scale": "pre_feedforward_layernorm.weight"}
    return tuple((j, renamed.get(j, h), t, p) for j, h, t, p in rows) + (
        ("post_attention_norm.scale", "post_attention_layernorm.weight", False, False),
        ("post_ffn_norm.scale", "post_feedforward_layernorm.weight", False, False),
    )


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Llama's tensors with Gemma's four norms per block, and Gemma 3's q/k norms."""
    return names.tensor_map(config, block_rows(names.BLOCK) + (QK_NORM if config.qk_norm else ()))


def gemma3_rope(
    hf: Mapping[str, Any], max_positions: int
) -> tuple[float, RopeScaling | None, float | None]:
    """``(theta, scaling, local theta or None)`` of Gemma 3's two RoPEs: the global layers'
    (scaled or not) and the sliding layers' (never scaled; None when it is the same)."""
    by_type = rope_parameters_by_type(hf)
    theta, scaling = rope(
        {**hf, "rope_parameters": by_type["full_attention"]},
        max_positions,
        "rope_parameters.full_attention",
    )
    local, local_scaling = rope(
        {**hf, "rope_parameters": by_type["sliding_attention"]},
        max_positions,
        "rope_parameters.sliding_attention",
    )
    if (local, local_scaling) == (theta, scaling):
        return theta, scaling, None
    if local_scaling is not None:
        raise InputError(
            "config.json: rope_parameters.sliding_attention has a rope_type other than "
            "'default' and differs from full_attention; jtp scales the global layers' RoPE only"
        )
    return theta, scaling, local


def claim(config: LlamaConfig) -> str | None:
    """Gemma's block (four norms) is Gemma 3's with q/k norms, Gemma 2's without."""
    if not config.sandwich_norms:
        return None
    return GEMMA3 if config.qk_norm else GEMMA2
