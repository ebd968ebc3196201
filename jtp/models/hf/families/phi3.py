"""Phi-3 (``Phi3ForCausalLM``): jtp's Llama, with two of each layer's tensors fused.

transformers' Phi-3 computes what its Llama does (pre-norm blocks, RMSNorm, GQA, RoPE on
the halves of a head, SwiGLU) with two projections per layer stored as one tensor each:

- ``self_attn.qkv_proj.weight``, ``(H*E + 2*K*E, D)``: rows ``[0, H*E)`` are q_proj's,
  the next ``K*E`` k_proj's, the last ``K*E`` v_proj's (``Phi3Attention.forward`` slices
  its output at ``H*E`` and ``H*E + K*E``);
- ``mlp.gate_up_proj.weight``, ``(2F, D)``: rows ``[0, F)`` the gate (the one silu is
  applied to), ``[F, 2F)`` up (``gate, up = x.chunk(2, -1); up * silu(gate)``).

jtp keeps the parts apart, as wq / wk / wv and w1 / w3. Column-splitting a fused kernel
over ``"tensor"`` would hand the first devices q heads only and the last v heads only
(transformers' own TP plan gathers ``qkv_proj``'s output for that reason); split apart,
each device holds whole q heads with the k/v heads they read, and whole gate columns with
the matching up columns, as for Llama. So each jtp parameter is a block of rows of a fused
tensor (:attr:`TensorMap.row_offset`): on load a device reads only its block of its part
(whole heads: q/k rows are RoPE-permuted within heads), on save the parts are put back in
HF's layout and stacked in HF's row order, one fused tensor at a time.

What Phi-3 configs carry that jtp does not compute is refused (:func:`check_config`), and
PEFT adapters are refused (:func:`refuse_peft`): PEFT puts one ``(A, B)`` pair on the
fused ``qkv_proj`` (and ``gate_up_proj``), shared by q, k and v, where jtp's LoRA has one
pair per projection.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.names import TensorMap
from jtp.models.hf.names import tensor_map as unfused_tensor_map
from jtp.models.llama import LlamaConfig

ARCHITECTURE = "Phi3ForCausalLM"
# Its window, when config.json sets one, applies to every layer. No claim() function: a
# model that came from no file is never called Phi-3 (save_pretrained without source=
# writes Llama's separate projections).
ARCHITECTURES = {ARCHITECTURE: Architecture("phi3", False, False, 4096, rms_norm_eps=1e-5)}
# Each fused tensor inside model.layers.{i}, and the per-projection tensors (names.py's
# names) whose rows it stacks, in HF's row order.
FUSED = {
    "self_attn.qkv_proj.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
# rope types transformers' Phi-3 maps onto LongRoPE (Phi3Config.convert_rope_params_to_dict)
LONGROPE = ("longrope", "su", "yarn")
_LAYER = re.compile(r"(model\.layers\.\d+\.)(.+)")


def _part_rows(config: LlamaConfig) -> dict[str, int]:
    """Rows of each part of a fused tensor (HF's out_features of the projection)."""
    e, f = config.head_dim, config.ffn_hidden
    q, kv = config.n_heads * e, config.n_kv_heads * e
    return {
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": kv,
        "self_attn.v_proj.weight": kv,
        "mlp.gate_proj.weight": f,
        "mlp.up_proj.weight": f,
    }


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Every (part of an) HF tensor of a Phi-3 checkpoint of ``config``, in HF's order:
    :func:`jtp.models.hf.names.tensor_map`'s, with the q/k/v and gate/up rows renamed to
    the fused tensor holding them, at their row offsets. Several entries then share one
    ``hf`` name (in row order); each is still one jtp parameter."""
    maps = unfused_tensor_map(config)
    rows = _part_rows(config)
    place = {}  # part -> (fused name, first row, rows of the fused tensor)
    for fused, parts in FUSED.items():
        offsets = [sum(rows[p] for p in parts[:k]) for k in range(len(parts))]
        total = sum(rows[p] for p in parts)
        place.update({p: (fused, o, total) for p, o in zip(parts, offsets, strict=True)})
    out = []
    for t in maps:
        m = _LAYER.fullmatch(t.hf)
        if m and m.group(2) in place:
            fused, offset, total = place[m.group(2)]
            t = dataclasses.replace(t, hf=m.group(1) + fused, row_offset=offset, hf_rows=total)
        out.append(t)
    return out


def check_config(hf: Mapping[str, Any], architecture: str = ARCHITECTURE) -> None:
    """A ``ValueError`` for what a Phi-3 ``config.json`` asks of transformers that jtp's
    Llama does not compute (the fields all architectures share are checked by
    :func:`jtp.models.hf.config.llama_config`).

    - LongRoPE (``rope_scaling`` of type ``longrope``, or ``su`` / ``yarn``, which
      transformers reads as ``longrope`` for Phi-3): the 128k models' per-frequency
      ``short_factor`` / ``long_factor``, switched at ``original_max_position_embeddings``,
      and a cos/sin scale. Any type but ``default`` is refused: transformers' Phi-3 accepts
      no other.
    - ``resid_pdrop`` (dropout on each block's two residual branches): jtp's Llama has no
      dropout. ``embd_pdrop`` is accepted: transformers' Phi-3 never applies it.
    """
    for field in ("rope_parameters", "rope_scaling"):
        params = hf.get(field) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind in LONGROPE:
            raise ValueError(
                f"config.json: {field}.rope_type={kind!r} is not supported: it is Phi-3's "
                "LongRoPE (per-frequency short_factor / long_factor, switched at "
                "original_max_position_embeddings, as the 128k-context models use); jtp "
                "computes plain RoPE only"
            )
        if kind != "default":
            raise ValueError(
                f"config.json: {field}.rope_type={kind!r} is not supported for "
                f"{ARCHITECTURE}: transformers' Phi-3 computes 'default' or 'longrope' only"
            )
    if hf.get("resid_pdrop"):
        raise ValueError(
            f"config.json: resid_pdrop={hf['resid_pdrop']!r} is not supported: Phi-3 drops "
            "out the residual branches while training, and jtp's Llama has no dropout "
            "(set it to 0.0)"
        )


def refuse_peft(hf: Mapping[str, Any], what: str) -> None:
    """A ``ValueError`` when ``hf`` (a ``config.json``) is Phi-3's: ``what`` (a PEFT
    adapter's load or save) has no exact mapping onto jtp's adapters."""
    if (hf.get("architectures") or [None])[0] == ARCHITECTURE:
        raise ValueError(
            f"{what}: {ARCHITECTURE} fuses q/k/v into qkv_proj and gate/up into "
            "gate_up_proj, and a PEFT LoRA adapter there is one (A, B) pair per fused "
            "module, shared by its parts, while jtp's adapters are one pair per projection "
            "(q, k, v, gate, up): the two do not map onto each other. Train LoRA in jtp and "
            "export the merged model with jtp.hf.save_pretrained (or --export-hf) instead"
        )
