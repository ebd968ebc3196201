"""The name map between Hugging Face tensors and jtp's Llama parameters, with the layout changes.

Llama's names are every family's: :data:`BLOCK` is one block's rows, and a family adds or
renames rows (Qwen's q/k/v biases and q/k norms, Gemma's four norms per block: their
modules in :mod:`jtp.models.hf.families`) and passes them to :func:`tensor_map`; an untied
``lm_head`` is a config field's. A scanned model
(``scan_layers``, the default) holds each block parameter once for all layers, stacked on a
leading layer axis (``layers.attention.wq.kernel`` of shape ``(L, D, H * E)``): HF's
``model.layers.{i}.*`` tensor is its slice ``i``, so the exported names stay HF's per-layer
names. A mixture-of-experts layer's experts are stacked too, on the axis after the layer
axis (``layers.feed_forward.experts.w1`` of shape ``(L, E, D, F)``), and the hub's one
tensor per expert, ``...experts.{e}.gate_proj.weight``, is its slice ``[i, e]``
(:attr:`TensorMap.expert`; :mod:`jtp.models.hf.families.experts`). Two layout changes,
each done here and nowhere else:

- **transpose**: ``torch.nn.Linear`` stores ``weight`` as ``(out_features, in_features)`` and
  computes ``x @ W.T``; Flax's ``nnx.Linear`` stores ``kernel`` as ``(in, out)`` and computes
  ``x @ K``. So ``K = W.T``. Embedding tables are ``(V, D)`` in both: no transpose.
- **RoPE permutation** of q and k: HF rotates the feature pairs ``(x[i], x[i + E/2])`` of a
  head (``rotate_half``), jtp the neighbours ``(x[2i], x[2i+1])`` (Meta's layout). jtp's
  feature ``2i`` is HF's ``i`` and ``2i+1`` is HF's ``i + E/2``, so the rows of ``q_proj`` /
  ``k_proj`` (weights and biases) and the ``E`` entries of Qwen3's and Gemma 3's ``q_norm`` /
  ``k_norm`` are reordered within each head. q and k move together, so ``q . k`` and the
  logits are unchanged. Getting this wrong under sharding is torchtitan#1483; the logit/KL test
  against transformers is what catches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jtp.models.llama import LlamaConfig
from jtp.models.lora import TARGETS


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor and the jtp parameter it becomes."""

    hf: str  # "model.layers.0.self_attn.q_proj.weight"
    jtp: str  # "layers.0.attention.wq.kernel"; scanned: "layers.attention.wq.kernel"
    transpose: bool  # HF (out, in) <-> Flax (in, out)
    rope_head_dim: int | None  # E: permute HF axis 0 within heads of E rows (q and k only)
    layer: int | None = None  # scanned: the slice of the stacked jtp parameter it is
    # MoE: the expert (the slice of the (E, ...) expert axis, after the layer axis when
    # scanned) of the stacked experts this per-expert HF tensor is
    expert: int | None = None
    row_offset: int = 0  # fused HF tensor (Phi-3's qkv_proj): this parameter's first row
    hf_rows: int | None = None  # fused HF tensor: all its rows; None: the tensor is all ours

    def hf_shape(self, jtp_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape, given its jtp parameter's (stacked or not); of a fused
        tensor, the whole tensor's, of which the parameter is ``hf_rows`` rows."""
        shape = tuple(jtp_shape[self.stacked_axes :])
        shape = tuple(reversed(shape)) if self.transpose else shape
        return shape if self.hf_rows is None else (self.hf_rows, *shape[1:])

    @property
    def stacked_axes(self) -> int:
        """Leading axes of the jtp parameter this tensor is one slice of (layer, expert)."""
        return (self.layer is not None) + (self.expert is not None)

    @property
    def label(self) -> str:
        """The jtp parameter, with the layer (and expert) when stacked:
        ``layers.attention.wq.kernel[3]``, ``layers.feed_forward.experts.w1[3, 5]``."""
        at = [str(i) for i in (self.layer, self.expert) if i is not None]
        return f"{self.jtp}[{', '.join(at)}]" if at else self.jtp

    def take(self, value: np.ndarray) -> np.ndarray:
        """This tensor's part of its jtp parameter's ``value`` (its layer and expert, when
        stacked)."""
        value = value if self.layer is None else value[self.layer]
        return value if self.expert is None else value[self.expert]


# One row of a block: (jtp path inside layers.{i}, HF path inside model.layers.{i},
# transpose, RoPE-permuted). An expert row (MoE) has a fifth entry, E: the jtp parameter
# stacks E experts on its leading axis and the HF path holds "{e}", one tensor per expert.
Row = tuple[str, str, bool, bool] | tuple[str, str, bool, bool, int]
BLOCK: tuple[Row, ...] = (
    ("attention_norm.scale", "input_layernorm.weight", False, False),
    ("attention.wq.kernel", "self_attn.q_proj.weight", True, True),
    ("attention.wk.kernel", "self_attn.k_proj.weight", True, True),
    ("attention.wv.kernel", "self_attn.v_proj.weight", True, False),
    ("attention.wo.kernel", "self_attn.o_proj.weight", True, False),
    ("ffn_norm.scale", "post_attention_layernorm.weight", False, False),
    ("feed_forward.w1.kernel", "mlp.gate_proj.weight", True, False),
    ("feed_forward.w3.kernel", "mlp.up_proj.weight", True, False),
    ("feed_forward.w2.kernel", "mlp.down_proj.weight", True, False),
)
# Tensors some checkpoints carry that hold no parameter: ignored, as transformers does.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def tensor_map(
    config: LlamaConfig,
    rows: tuple[Row, ...] = BLOCK,
    *,
    layer_rows: Callable[[int], tuple[Row, ...]] | None = None,
) -> list[TensorMap]:
    """Every tensor of an HF checkpoint of ``config`` whose blocks hold ``rows`` (a family's:
    :func:`jtp.models.hf.families.tensor_map`), or layer ``i`` ``layer_rows(i)`` (MoE
    models with dense layers), in HF's order; an expert row gives one tensor per expert."""
    e = config.head_dim
    out = [TensorMap("model.embed_tokens.weight", "tok_embeddings.embedding", False, None)]
    for i in range(config.n_layers):
        for row in layer_rows(i) if layer_rows else rows:
            jtp, hf, transpose, permuted = row[:4]
            rope, hf = e if permuted else None, f"model.layers.{i}.{hf}"
            # scanned: slice i of the stacked parameter
            jtp, layer = (f"layers.{jtp}", i) if config.scan_layers else (f"layers.{i}.{jtp}", None)
            if len(row) == 4:
                out.append(TensorMap(hf, jtp, transpose, rope, layer=layer))
            else:  # one tensor per expert, each a slice of the stacked experts
                for x in range(row[4]):
                    out.append(TensorMap(hf.format(e=x), jtp, transpose, rope, layer, expert=x))
    out.append(TensorMap("model.norm.weight", "norm.scale", False, None))
    if not config.tie_embeddings:  # tied: lm_head is embed_tokens, stored once
        out.append(TensorMap("lm_head.weight", "output.kernel", True, None))
    return out


# PEFT's short target name -> the HF module inside model.layers.{i} (jtp's: jtp.models.lora).
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the HF model's own names


def lora_tensor_map(config: LlamaConfig) -> list[TensorMap]:
    """The adapter tensors of a LoRA ``config`` under PEFT's names, layer by layer.

    jtp's ``lora_a (in, r)`` is PEFT's ``lora_A.weight (r, in)`` and ``lora_b (r, out)`` is
    ``lora_B.weight (out, r)``: both transposed, as kernels are. ``B`` produces q/k output
    features, so its rows take q/k's RoPE permutation (``B A`` must be a delta of HF's
    ``q_proj`` rows); ``A`` reads the input, which no permutation touches.
    """
    out = []
    for i in range(config.n_layers):
        for target in config.lora_targets:
            rope = config.head_dim if target in ("q", "k") else None
            module = TARGETS[target]
            for factor, hf_factor, perm in (("lora_a", "lora_A", None), ("lora_b", "lora_B", rope)):
                hf = f"{PEFT_PREFIX}model.layers.{i}.{HF_MODULES[target]}.{hf_factor}.weight"
                if config.scan_layers:
                    jtp = f"layers.{module}.lora.{factor}"
                    out.append(TensorMap(hf, jtp, True, perm, layer=i))
                else:
                    out.append(TensorMap(hf, f"layers.{i}.{module}.lora.{factor}", True, perm))
    return out


def rope_perm(head_dim: int) -> np.ndarray:
    """``p`` with ``jtp_head[k] = hf_head[p[k]]``: ``[0, E/2, 1, E/2 + 1, ...]``."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(head_dim)


def permute_heads(x: np.ndarray, head_dim: int, *, to_jtp: bool) -> np.ndarray:
    """Reorder axis 0 of ``x`` (whole heads of ``head_dim`` rows) between HF's and jtp's order."""
    p = rope_perm(head_dim)
    p = p if to_jtp else np.argsort(p)
    heads = x.reshape(x.shape[0] // head_dim, head_dim, *x.shape[1:])  # (heads, E, ...)
    return heads[:, p].reshape(x.shape)


def to_hf(t: TensorMap, value: np.ndarray) -> np.ndarray:
    """A whole jtp parameter (its layer ``t.layer``, when stacked) in HF's layout."""
    out = value.T if t.transpose else value
    if t.rope_head_dim is not None:
        out = permute_heads(out, t.rope_head_dim, to_jtp=False)
    return out


def read_jtp_slice(
    t: TensorMap,
    index: tuple[slice, ...],
    shape: tuple[int, ...],
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> np.ndarray:
    """The block ``index`` of the jtp parameter, reading only what it needs of the HF tensor.

    ``read(hf_index)`` returns that block of the HF tensor; of a stacked parameter, the block
    of layer ``t.layer`` and expert ``t.expert`` (the leading axes of ``index``, these, are
    the caller's). A permuted axis is
    read in whole heads (a tensor-parallel shard holds whole heads, so that is exactly its
    rows), put in jtp's order, and trimmed to ``index``. Of a fused HF tensor only the
    parameter's own rows (from ``t.row_offset``) are read.
    """
    if t.row_offset:  # a part of a fused tensor: its rows, counted from the part's first
        read = _rows_from(read, t.row_offset)
    if t.stacked_axes:  # a stacked parameter: this tensor is one layer (expert) of it
        index, shape = index[t.stacked_axes :], shape[t.stacked_axes :]
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]  # [(start, stop)]
    hf_bounds = list(reversed(bounds)) if t.transpose else list(bounds)
    if t.rope_head_dim is None:
        block = read(tuple(slice(a, b) for a, b in hf_bounds))
    else:
        e = t.rope_head_dim
        start, stop = hf_bounds[0]
        h0, h1 = start // e, -(-stop // e)  # the heads the rows [start, stop) touch
        rows = read((slice(h0 * e, h1 * e), *(slice(a, b) for a, b in hf_bounds[1:])))
        block = permute_heads(rows, e, to_jtp=True)[start - h0 * e : stop - h0 * e]
    return block.T if t.transpose else block


def _rows_from(
    read: Callable[[tuple[slice, ...]], np.ndarray], offset: int
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """``read`` of the rows ``offset + r`` of an HF tensor, for the part rows ``r``."""

    def shifted(index: tuple[slice, ...]) -> np.ndarray:
        rows = index[0]
        return read((slice(rows.start + offset, rows.stop + offset), *index[1:]))

    return shifted
