"""LoRA adapters on the Llama's linears, scaled as PEFT scales them, and merging them back.

flax's ``nnx.LoRALinear`` computes ``x @ W + x @ A @ B`` with no scaling; PEFT (and the LoRA
paper) compute ``x @ W + (alpha / r) * x @ A @ B``. The scale matters for training, not
only for export: with AdamW the update of ``A B`` is about ``lr`` per step whatever its
scale, so ``alpha / r`` sets how far the adapted layer moves per step, and an adapter
trained with one scale and run with another is a different model. :class:`LoRALinear` adds
the scale, as a static attribute, and nothing else: being a ``nnx.LoRALinear`` it keeps the
column/row layouts of :mod:`jtp.parallel.layer_rules` (column: ``A`` replicated, ``B`` split
like the kernel's columns; row: ``A`` split like its rows, ``B`` replicated), so an adapted
column -> row pair still costs one all-reduce.

Which linears are adapted is named as PEFT names them (``q k v o gate up down``, for
``q_proj``, ..., ``down_proj``) in :class:`~jtp.models.decoder_config.DecoderConfig`'s
``lora_targets``; :data:`TARGETS` maps them onto jtp's modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.parallel.names import path_str

# PEFT's short name -> the adapted module inside a block (jtp.models.decoder.TransformerBlock).
TARGETS = {
    "q": "attention.wq",
    "k": "attention.wk",
    "v": "attention.wv",
    "o": "attention.wo",
    "gate": "feed_forward.w1",
    "up": "feed_forward.w3",
    "down": "feed_forward.w2",
}
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")  # of DecoderConfig


def parse_targets(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"q,v"`` or ``("q", "v")`` -> ``("q", "v")``, in :data:`TARGETS`' order; HF's
    spellings (``q_proj``) are accepted. An unknown name is a ``ValueError`` listing them."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().removesuffix("_proj") for n in names if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ValueError(
            f"lora targets {value!r}: {unknown or 'none given'}; choose from {','.join(TARGETS)}"
        )
    return tuple(t for t in TARGETS if t in names)


class LoRALinear(nnx.LoRALinear):
    """``y = x @ W + b + (alpha / r) * x @ A @ B``: flax's LoRALinear with PEFT's scale.

    ``A (in, r)`` starts random and ``B (r, out)`` at zero (flax's and PEFT's defaults), so a
    fresh adapter computes what the base layer does. Both are ``nnx.LoRAParam`` (a subclass
    of ``nnx.Param``), which is how the trainer tells them from the frozen base.

    Example::

      layer = LoRALinear(64, 32, lora_rank=8, lora_alpha=16.0, rngs=nnx.Rngs(0))
      y = layer(jnp.ones((4, 64)))  # (4, 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora_rank: int,
        lora_alpha: float,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        **kwargs: Any,
    ):
        super().__init__(
            in_features,
            out_features,
            lora_rank=lora_rank,
            lora_dtype=dtype,
            lora_param_dtype=param_dtype,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            **kwargs,
        )
        self.scale = float(lora_alpha) / lora_rank  # static: part of the graph, not a param

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.Linear.__call__(self, x)  # (..., out)
        return y + self.scale * self.lora(x)  # (..., in) @ (in, r) @ (r, out)


def adapted(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` of every :class:`LoRALinear` in ``model``, in graph order."""
    return [(path_str(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``W + scale * A @ B`` in ``kernel``'s layout and dtype, for stacked layers too
    (``(L, in, out)`` with ``(L, in, r)`` and ``(L, r, out)``), in float32 before the cast."""

    def merge(k, a, b):
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        return (k.astype(jnp.float32) + scale * delta).astype(k.dtype)  # (..., in, out)

    return jax.jit(merge, out_shardings=getattr(kernel, "sharding", None))(kernel, a, b)


def merge_lora[M: nnx.Module](model: M) -> M:
    """``model`` without adapters: each adapted kernel replaced by ``W + (alpha / r) A B``,
    computed where its shards lie (one kernel at a time: the peak is one kernel more).

    The result is the model ``config`` without LoRA (default :data:`LORA_FIELDS`) builds, sharing
    every other array with ``model``: what ``jtp.hf.save_pretrained`` writes as the merged
    checkpoint and what generation can run without the low-rank path.
    """
    plain = {f.name: f.default for f in dataclasses.fields(model.config) if f.name in LORA_FIELDS}
    config = dataclasses.replace(model.config, **plain)  # lora_rank 0, alpha/targets defaults
    abstract = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    values = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, layer in adapted(model):
        kernel = f"{path}.kernel"
        a, b = values.pop(f"{path}.lora.lora_a"), values.pop(f"{path}.lora.lora_b")
        values[kernel] = merged_kernel(values[kernel], a, b, layer.scale)
    updates = [(p, v.replace(values[path_str(p)])) for p, v in nnx.to_flat_state(target)]
    return nnx.merge(graphdef, nnx.from_flat_state(updates))
