"""Layers of two kinds in one compiled block: sliding-window layers (Mistral, Qwen, Gemma:
keys ``t - W < s <= t``, and Gemma 3's own RoPE base) among global ones.

A scanned model (:mod:`jtp.models.stack`) compiles one block for all its layers, so what
differs between layers must reach the block as data: the layer's kind is its entry of the
scan's per-layer inputs (:func:`layer_kinds`), a traced bool. Two choices follow from it:

- attention (:func:`layer_attention`): ``jax.lax.cond`` between two attentions, each with a
  static window, rather than one attention with a traced mask. Each branch stays the kernel
  :mod:`jtp.models.attention` chooses: cuDNN's fused kernel takes a static window only (a
  mask would send it to XLA's O(T^2) path), blockwise skips the tiles outside a static
  window. Only the branch of the layer's kind runs.
- small tables (the RoPE angles): an element-wise select (:func:`by_kind`), cheaper than a
  branch.

Where every layer is of one kind, or the layers are unrolled, the kind is a Python bool
when tracing: no branch is compiled at all, and a model without windows compiles the
program it always did.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtp.models.attention import attention, positioned_attention
from jtp.models.decoder_config import DecoderConfig
from jtp.models.ring import ring_attention
from jtp.parallel.context import attend_pieces, context_active


def layer_kinds(c: DecoderConfig) -> tuple[tuple[bool, ...], np.ndarray | None]:
    """How the blocks learn whether they are sliding layers: ``((kind,), None)`` when every
    layer is of one kind (a static argument: no branch is compiled), ``((), flags)`` when
    both kinds occur: ``flags`` (L,) bool, each layer's entry passed to its block (a scan
    over stacked layers reads it as data, an unrolled loop as a constant)."""
    flags = c.layer_sliding()
    if len(set(flags)) == 1:
        return (flags[0],), None
    return (), np.asarray(flags)


def by_kind(sliding: bool | jax.Array, if_sliding: Any, otherwise: Any) -> Any:
    """``if_sliding`` on a sliding layer, else ``otherwise`` (pytrees of one structure):
    chosen while tracing when ``sliding`` is a Python bool, element-wise when it is traced
    (one scanned block for layers of both kinds)."""
    if isinstance(sliding, jax.Array):
        return jax.tree.map(lambda a, b: jnp.where(sliding, a, b), if_sliding, otherwise)
    return if_sliding if sliding else otherwise


def layer_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    *,
    sliding: bool | jax.Array,
    window: int | None,
    implementation: str = "auto",
    scale: float | None = None,
    softcap: float | None = None,
    positions_bt: jax.Array | None = None,
    context_attention: str = "all-gather",
) -> jax.Array:
    """Causal self-attention of one layer of a model whose sliding layers see keys
    ``t - window < s <= t`` (transformers' window) and whose other layers see every earlier
    key; ``sliding`` says which this layer is: a Python bool when known while tracing, else
    a traced bool, and then ``jax.lax.cond`` runs the attention of its kind (each with a
    static window: the module docstring says why). A window at least as long as the
    sequence masks nothing and is left out.

    ``positions_bt`` ((B, T) int, every row alike): where each token sits in its sequence
    when the batch is not in order (context parallelism's balanced pieces); the masks then
    compare positions. With it, or on a mesh with a context axis, the attention runs
    through :func:`jtp.parallel.context.attend_pieces`: each device's pieces of the
    sequence against every key, gathered (``context_attention="all-gather"``) or passed
    around a ring ("ring", :func:`jtp.models.ring.ring_attention`; XLA's kernel there is
    the ring's with one tile per step).
    """
    if positions_bt is not None or context_active():

        def by_position(q_bthe, k_bske, v_bske, q_pos_t, k_pos_s, *, sliding_window):
            return positioned_attention(
                q_bthe,
                k_bske,
                v_bske,
                q_pos_t,
                k_pos_s,
                implementation="xla" if implementation == "auto" else implementation,
                window=sliding_window,
                scale=scale,
                softcap=softcap,
            )

        def by_ring(q_bthe, k_bske, v_bske, q_pos_t, k_pos_s, *, sliding_window, **axis):
            # "blockwise": its tiles; else one tile per step (XLA's dense arithmetic)
            block = {} if implementation == "blockwise" else {"block_q": t, "block_k": t}
            return ring_attention(
                q_bthe,
                k_bske,
                v_bske,
                q_pos_t,
                k_pos_s,
                window=sliding_window,
                scale=scale,
                softcap=softcap,
                **block,
                **axis,
            )

        t = q_bthe.shape[1]

        def run_positioned(w: int | None) -> jax.Array:
            return attend_pieces(
                functools.partial(by_position, sliding_window=w),
                q_bthe,
                k_bske,
                v_bske,
                positions_bt,
                strategy=context_attention,
                ring=functools.partial(by_ring, sliding_window=w),
            )

        return _by_layer_kind(run_positioned, sliding, window)
    t = q_bthe.shape[1]
    local = None if window is None or window >= t else (window - 1, 0)

    def run(local_window_size: tuple[int, int] | None) -> jax.Array:
        return attention(
            q_bthe,
            k_bske,
            v_bske,
            implementation=implementation,
            is_causal=True,
            local_window_size=local_window_size,
            scale=scale,
            softcap=softcap,
        )

    return _by_layer_kind(run, sliding, local)


def _by_layer_kind(run: Any, sliding: bool | jax.Array, windowed: Any) -> jax.Array:
    """``run(windowed)`` on a sliding layer, ``run(None)`` on a global one: chosen while
    tracing when ``sliding`` is a Python bool, by ``jax.lax.cond`` when it is traced (this
    layer's kind is scan data), and no branch at all when there is no window to apply."""
    if windowed is None:
        return run(None)
    if isinstance(sliding, jax.Array):
        return jax.lax.cond(sliding, lambda: run(windowed), lambda: run(None))
    return run(windowed if sliding else None)
