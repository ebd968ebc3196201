"""Hugging Face ``config.json`` <-> :class:`jtp.models.llama.LlamaConfig`.

Reads both spellings found on disk: the hub's (``rope_theta`` and ``rope_scaling`` at top
level) and transformers 5.x's (``rope_parameters``, with ``rope_theta`` inside). Anything
jtp's Llama would compute differently from transformers is a ``ValueError`` naming the field,
raised before a single weight is read: an architecture outside :data:`SUPPORTED_ARCHITECTURES`,
another RoPE scaling type, a sliding window shorter than the positions used, biases where
jtp's Llama has none, another activation, dropout. Phi-3's own refusals (LongRoPE, residual
dropout) are :func:`jtp.models.hf.phi3.check_config`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from jtp.models.hf import phi3
from jtp.models.llama import Llama3RopeScaling, LlamaConfig


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


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", False, False, 2048),
    "MistralForCausalLM": Architecture("mistral", False, False, 4096 * 32, sliding_window=4096),
    "Qwen2ForCausalLM": Architecture("qwen2", True, False, 32768, sliding_needs_flag=True),
    "Qwen3ForCausalLM": Architecture("qwen3", False, True, 32768, 128, sliding_needs_flag=True),
    # Phi-3: fused qkv_proj / gate_up_proj (split on load: jtp.models.hf.phi3); its window,
    # when config.json sets one, applies to every layer.
    phi3.ARCHITECTURE: Architecture("phi3", False, False, 4096, rms_norm_eps=1e-5),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
ROPE_TYPES = ("default", "llama3")  # HF rope types jtp computes
_DEFAULT_THETA = 10000.0  # transformers' default_theta
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of an HF model directory (or the file itself) as a dict."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(file) as f:
        return json.load(f)


def architecture(hf: Mapping[str, Any]) -> str:
    """The supported architecture named by ``architectures`` (refusing any other)."""
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ValueError(
            f"config.json: architectures={names!r} is not supported; jtp.hf loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return names[0]


def _require(hf: Mapping[str, Any], field: str) -> Any:
    if hf.get(field) is None:
        raise ValueError(f"config.json: field {field!r} is missing")
    return hf[field]


def _refuse_if(hf: Mapping[str, Any], field: str, bad: bool, why: str) -> None:
    if bad:
        raise ValueError(f"config.json: {field}={hf.get(field)!r} is not supported: {why}")


def rope(hf: Mapping[str, Any], max_position_embeddings: int) -> tuple[float, Any]:
    """``(rope_theta, Llama3RopeScaling | None)`` from either spelling of the RoPE fields."""
    params = hf.get("rope_parameters")
    if params is not None and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            "config.json: rope_parameters is nested by layer type; jtp's Llama has one RoPE"
        )
    field = "rope_parameters" if params else "rope_scaling"
    params = dict(params or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config.json: {field}.rope_type={kind!r} is not supported; jtp computes "
            f"{', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"config.json: partial_rotary_factor={partial!r} is not supported; jtp rotates "
            "every feature of a head"
        )
    if kind == "default":
        return theta, None
    params.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"config.json: {field} of rope_type 'llama3' lacks {missing}")
    return theta, Llama3RopeScaling(**{k: params[k] for k in _LLAMA3_KEYS})


def sliding_window(hf: Mapping[str, Any], arch: Architecture) -> int | None:
    """The attention window transformers would use, or None for full causal attention."""
    if arch.sliding_needs_flag and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window", arch.sliding_window)


def max_positions_of(hf: Mapping[str, Any]) -> int:
    """``max_position_embeddings``, or transformers' default for the architecture: the
    longest sequence the checkpoint was made for."""
    arch = ARCHITECTURES[architecture(hf)]
    return int(hf.get("max_position_embeddings") or arch.max_position_embeddings)


def llama_config(
    hf: Mapping[str, Any], *, max_seq_len: int | None = None, remat: str | bool = "none"
) -> LlamaConfig:
    """jtp's :class:`LlamaConfig` for an HF config, or a ``ValueError`` naming what differs.

    Args:
      hf: the parsed ``config.json``.
      max_seq_len: the longest sequence the model will see ("positions used"; default
        ``max_position_embeddings``). A sliding window at least this long never masks
        anything, so it is accepted; a shorter one is refused.
      remat: the remat policy (:mod:`jtp.models.stack`; True / False: "full" / "none").
    """
    arch = ARCHITECTURES[architecture(hf)]
    if arch.model_type == "phi3":
        phi3.check_config(hf)
    act = hf.get("hidden_act", "silu")
    _refuse_if(hf, "hidden_act", act != "silu", "jtp's feed-forward is SwiGLU (silu)")
    _refuse_if(
        hf, "attention_bias", bool(hf.get("attention_bias")),
        "it also puts a bias on o_proj, and jtp's attention output has none",
    )  # fmt: skip
    _refuse_if(hf, "mlp_bias", bool(hf.get("mlp_bias")), "jtp's feed-forward has no biases")
    _refuse_if(
        hf, "attention_dropout", bool(hf.get("attention_dropout")), "jtp's Llama has no dropout"
    )
    dim, n_heads = int(_require(hf, "hidden_size")), int(_require(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim") or arch.head_dim or dim // n_heads
    max_positions = max_positions_of(hf)
    positions = max_seq_len or max_positions
    window = sliding_window(hf, arch)
    if window is not None and window < positions:
        raise ValueError(
            f"config.json: sliding_window={window} is shorter than the positions used "
            f"({positions}); jtp's attention is full causal, identical only while sequences "
            f"fit the window: pass max_seq_len <= {window} (the CLI's --seq-len)"
        )
    theta, scaling = rope(hf, max_positions)
    return LlamaConfig(
        vocab_size=int(_require(hf, "vocab_size")),
        dim=dim,
        n_layers=int(_require(hf, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        ffn_hidden=int(_require(hf, "intermediate_size")),
        max_seq_len=positions,
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", arch.rms_norm_eps)),
        remat=remat,
        explicit_head_dim=None if head_dim * n_heads == dim else int(head_dim),
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
    )


def default_architecture(config: LlamaConfig) -> str:
    """The HF class that computes what ``config`` does (for a model that came from no file)."""
    if config.qkv_bias and config.qk_norm:
        raise ValueError("no supported HF architecture has both q/k/v biases and q/k norms")
    return (
        "Qwen3ForCausalLM"
        if config.qk_norm
        else "Qwen2ForCausalLM"
        if config.qkv_bias
        else "LlamaForCausalLM"
    )


def hf_config(config: LlamaConfig, arch: str, dtype: str) -> dict[str, Any]:
    """A transformers-5 ``config.json`` for ``config`` as architecture ``arch``."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters.update(rope_type="llama3", **dataclasses.asdict(config.rope_scaling))
    return {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch].model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": dtype,
    }


def describes(hf: Mapping[str, Any], config: LlamaConfig) -> None:
    """Raise a ``ValueError`` unless ``hf`` describes a model shaped and computed as ``config``
    (``max_seq_len``, ``remat``, ``scan_layers``, dtypes, the attention kernel and
    ``kv_replicas`` aside: they are how jtp runs it, not what it is)."""
    theirs = dataclasses.replace(
        llama_config(hf, max_seq_len=config.max_seq_len),
        remat=config.remat,
        scan_layers=config.scan_layers,
        param_dtype=config.param_dtype,
        dtype=config.dtype,
        attention=config.attention,
        kv_replicas=config.kv_replicas,
    )
    diff = [
        f"{f.name}: config.json gives {getattr(theirs, f.name)!r}, the model has "
        f"{getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if getattr(theirs, f.name) != getattr(config, f.name)
    ]
    if diff:
        raise ValueError("the source config.json does not describe this model: " + "; ".join(diff))
