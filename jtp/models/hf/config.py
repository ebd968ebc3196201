"""Hugging Face ``config.json`` <-> :class:`jtp.models.llama.LlamaConfig`.

Reads both spellings found on disk: the hub's (``rope_theta`` and ``rope_scaling`` at top
level; Gemma 3's ``rope_local_base_freq``, ``sliding_window_pattern``) and transformers 5.x's
(``rope_parameters``, with ``rope_theta`` inside, nested by layer type for Gemma 3;
``layer_types``). Sliding windows are computed on the layers transformers gives them:
every layer (Mistral, Phi-3), those from ``max_window_layers`` on (Qwen, with
``use_sliding_window``), Gemma's interleaved ones, or ``layer_types`` where config.json
lists them. Anything jtp's Llama would compute differently from transformers is a
``ValueError`` naming the field, raised before a single weight is read: an architecture
outside :data:`SUPPORTED_ARCHITECTURES` (the multimodal Gemma 3 included), another RoPE
scaling type, biases where jtp's Llama has none, another activation, dropout, bidirectional
attention. RoPE fields: :mod:`jtp.models.hf.rope_config`; which layers slide:
:mod:`jtp.models.hf.layer_types`; what one family reads, writes or refuses beyond this
(Gemma's fields, Phi-3's LongRoPE): its module in :mod:`jtp.models.hf.families`, consulted
here through that package's functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.hf import families
from jtp.models.hf.families import ARCHITECTURES, REFUSED
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.fields import positive_float, positive_int
from jtp.models.hf.layer_types import pattern_of, sliding_layers, window_fields
from jtp.models.hf.rope_config import rope, rope_parameters
from jtp.models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# Known, and refused with the reason (not a text-only causal LM jtp computes): each family's
# REFUSED (Gemma 3's multimodal model).
REFUSED_ARCHITECTURES = REFUSED


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of an HF model directory (or the file itself) as a dict."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise InputError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise InputError(f"{file} is not a JSON object")
    return hf


def architecture(hf: Mapping[str, Any]) -> str:
    """The supported architecture named by ``architectures`` (refusing any other)."""
    names = hf.get("architectures") or []
    if len(names) == 1 and names[0] in REFUSED_ARCHITECTURES:
        raise InputError(
            f"config.json: architectures={names!r} is not supported: "
            f"{REFUSED_ARCHITECTURES[names[0]]}"
        )
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise InputError(
            f"config.json: architectures={names!r} is not supported; jtp.hf loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return names[0]


def _refuse_if(hf: Mapping[str, Any], field: str, bad: bool, why: str) -> None:
    if bad:
        raise InputError(f"config.json: {field}={hf.get(field)!r} is not supported: {why}")


def sliding_window(hf: Mapping[str, Any], arch: Architecture) -> int | None:
    """The attention window of transformers' sliding layers, or None for none."""
    if arch.window_layers == "none":
        return None
    if arch.sliding_needs_flag and not hf.get("use_sliding_window", False):
        return None
    window = hf["sliding_window"] if "sliding_window" in hf else arch.sliding_window
    return None if window is None else positive_int({"sliding_window": window}, "sliding_window")


def max_positions_of(hf: Mapping[str, Any]) -> int:
    """``max_position_embeddings``, or transformers' default for the architecture: the
    longest sequence the checkpoint was made for."""
    arch = ARCHITECTURES[architecture(hf)]
    return positive_int(hf, "max_position_embeddings", arch.max_position_embeddings)


def llama_config(
    hf: Mapping[str, Any], *, max_seq_len: int | None = None, remat: str | bool = "none"
) -> LlamaConfig:
    """jtp's :class:`LlamaConfig` for an HF config, or a ``ValueError`` naming what differs.

    Args:
      hf: the parsed ``config.json``.
      max_seq_len: the longest sequence the model will see (default
        ``max_position_embeddings``).
      remat: the remat policy (:mod:`jtp.models.stack`; True / False: "full" / "none").
    """
    name = architecture(hf)
    arch = ARCHITECTURES[name]
    families.check_config(hf, name)
    if arch.hidden_act:  # Gemma reads hidden_activation instead (its config_fields)
        act = hf.get("hidden_act", "silu")
        _refuse_if(hf, "hidden_act", act != "silu", "jtp's feed-forward is SwiGLU (silu)")
    _refuse_if(
        hf,
        "attention_bias",
        bool(hf.get("attention_bias")),
        "it also puts a bias on o_proj, and jtp's attention output has none",
    )
    _refuse_if(hf, "mlp_bias", bool(hf.get("mlp_bias")), "jtp's feed-forward has no biases")
    _refuse_if(
        hf, "attention_dropout", bool(hf.get("attention_dropout")), "jtp's Llama has no dropout"
    )
    dim, n_heads = positive_int(hf, "hidden_size"), positive_int(hf, "num_attention_heads")
    head_dim = positive_int(hf, "head_dim", None) or arch.head_dim or dim // n_heads
    max_positions = max_positions_of(hf)
    positions = max_seq_len or max_positions
    n_layers = positive_int(hf, "num_hidden_layers")
    extra = families.config_fields(hf, name, max_positions)
    if "rope_theta" not in extra:  # the family did not read its own RoPE (Gemma 3 does)
        extra["rope_theta"], extra["rope_scaling"] = rope(hf, max_positions)
    window = sliding_window(hf, arch)
    flags = sliding_layers(
        hf, arch.window_layers, n_layers, lambda: families.sliding_pattern(hf, name)
    )
    if not any(flags):  # no sliding layer: the window is on none
        window = None
    local_theta = extra.get("local_rope_theta")
    layers = None if window is None and local_theta is None else pattern_of(flags)
    return LlamaConfig(
        vocab_size=positive_int(hf, "vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=positive_int(hf, "num_key_value_heads", n_heads),
        ffn_hidden=positive_int(hf, "intermediate_size"),
        max_seq_len=positions,
        norm_eps=positive_float(hf, "rms_norm_eps", arch.rms_norm_eps),
        remat=remat,
        explicit_head_dim=None if head_dim * n_heads == dim else int(head_dim),
        qkv_bias=extra.pop("qkv_bias", arch.qkv_bias),  # Qwen2-MoE's config has a field
        qk_norm=arch.qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", arch.tied)),
        sliding_window=window,
        sliding_layers=layers,
        **extra,
    )


def hf_config(config: LlamaConfig, arch: str, dtype: str) -> dict[str, Any]:
    """A transformers-5 ``config.json`` for ``config`` as architecture ``arch``."""
    a = ARCHITECTURES[arch]
    extra = families.hf_fields(config, arch)
    # The family's own rope_parameters (Gemma 3's, by layer type) in the generic one's place.
    rope = extra.pop("rope_parameters", None) or rope_parameters(
        config.rope_theta, config.rope_scaling
    )
    needs_window = a.sliding_window if a.window_always_read else None
    extra.update(window_fields(config, a.window_layers, a.sliding_needs_flag, needs_window))
    if config.head_dim != config.dim // config.n_heads or a.head_dim_field:
        extra["head_dim"] = config.head_dim
    return {
        "architectures": [arch],
        "model_type": a.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        **({"hidden_act": "silu"} if a.hidden_act else {}),
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": dtype,
        **extra,
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

    def seen(c: LlamaConfig, name: str) -> Any:
        # Layer kinds compared layer by layer: sliding_layers (True, False) and (True, False,
        # True, False) describe the same four layers.
        return c.layer_sliding() if name == "sliding_layers" else getattr(c, name)

    diff = [
        f"{f.name}: config.json gives {getattr(theirs, f.name)!r}, the model has "
        f"{getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if seen(theirs, f.name) != seen(config, f.name)
    ]
    if diff:
        raise InputError("the source config.json does not describe this model: " + "; ".join(diff))
