"""Running a model's blocks: one after the other, or scanned over stacked layers; and what
activation checkpointing (remat) keeps of each block for the backward pass.

Unrolled blocks (an ``nnx.List``) trace and compile once per block: compile time grows with
the depth. Stacked blocks (:func:`jtp.parallel.stacked.stack`: every variable with a leading
layer axis) run as one ``jax.lax.scan`` whose body is one block, traced and compiled once.
Both compute the same numbers from the same weights.

Remat policies, per block (``jax.checkpoint`` with a policy around each block):

- ``"none"``: no checkpointing: the forward keeps every intermediate the backward needs
  (attention scores and probabilities included). Most memory, no recomputation.
- ``"full"``: keeps only the block's input; the backward recomputes the whole block
  (one more forward pass: ~1/3 more FLOPs per step, and its collectives again).
- ``"dots"``: keeps the outputs of the matmuls without batch dimensions (the projections
  ``wq wk wv wo w1 w2 w3``: ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``);
  recomputes the element-wise work (norms, RoPE, SwiGLU) and attention's scores and softmax
  (batched matmuls).
- ``"minimal"``: keeps the block's input and its attention output ``softmax(q k^T) v``
  (``(B, T, H, E)``, split by heads under tensor parallelism; marked
  :data:`ATTENTION_OUT`); recomputes everything else.

Memory ``full <= minimal <= dots <= none``; recomputed FLOPs the other way round
(``tests/models/test_remat.py`` reads both from the compiled program).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.parallel.stacked import n_layers

REMAT_POLICIES = ("none", "full", "dots", "minimal")
ATTENTION_OUT = "attention_out"  # the checkpoint_name "minimal" keeps


def remat_name(value: str | bool) -> str:
    """The policy ``value`` names; the old booleans mean ``True``: "full", ``False``: "none"."""
    if value is True or value is False:
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(
            f"remat={value!r} must be one of {REMAT_POLICIES} (or a bool: True is 'full', "
            "False 'none')"
        )
    return value


def checkpoint_policy(name: str) -> Any:
    """The ``jax.checkpoint`` policy of a remat policy other than "none"."""
    policies = jax.checkpoint_policies
    return {
        "full": None,  # nothing saveable: only the checkpointed function's inputs are kept
        "dots": policies.dots_with_no_batch_dims_saveable,
        "minimal": policies.save_only_these_names(ATTENTION_OUT),
    }[remat_name(name)]


def _call(block: nnx.Module, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
    return block(x, *args, **kwargs)


def _layer(tree: Any, i: int) -> Any:
    """Layer ``i``'s slice of a pytree whose leaves lead with the layer axis."""
    return jax.tree.map(lambda a: a[i], tree)


def run_blocks(
    layers: Any,
    x: jax.Array,
    *args: Any,
    remat: str = "none",
    xs: Any = None,
    cache: Any = None,
    **kwargs: Any,
) -> jax.Array | tuple[jax.Array, Any]:
    """``x`` through every block of ``layers`` in order (``x = block(x, *args)``), each
    under the ``remat`` policy.

    ``layers``: an ``nnx.List`` of blocks (run one after the other) or a module built by
    :func:`jtp.parallel.stacked.stack` (run by :func:`scan_blocks`). ``xs``: per-layer
    inputs (a pytree, leading axis the layers; None: none), layer i's slice passed last:
    ``block(x, *args, xs[i])`` (what differs between layers of one compiled block, such as
    whether it is a sliding-window layer). ``cache``: per-layer state each block reads and
    replaces (a pytree, leading axis the layers: the key/value cache), layer i's passed as
    ``block(..., cache=cache[i], **kwargs)``; each block then returns ``(x, its new
    cache)`` and so does this function, the new caches stacked again. ``kwargs``: keyword
    arguments every block gets.
    """
    remat = remat_name(remat)
    if n_layers(layers) is None:
        call = _call if remat == "none" else nnx.remat(_call, policy=checkpoint_policy(remat))
        new = []
        for i, block in enumerate(layers):
            own = () if xs is None else (_layer(xs, i),)
            if cache is None:
                x = call(block, x, *args, *own, **kwargs)
            else:
                x, layer_cache = call(block, x, *args, *own, cache=_layer(cache, i), **kwargs)
                new.append(layer_cache)
        if cache is None:
            return x
        return x, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *new)

    def body(block: nnx.Module, x: jax.Array, per_layer: tuple[Any, Any]) -> tuple[Any, Any]:
        xi, layer_cache = per_layer
        own = () if xs is None else (xi,)
        if cache is None:
            return block(x, *args, *own, **kwargs), None
        return block(x, *args, *own, cache=layer_cache, **kwargs)

    x, new = scan_blocks(layers, body, x, (xs, cache), remat=remat)
    return x if cache is None else (x, new)


def scan_blocks(
    layers: Any,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat: str = "none",
) -> tuple[Any, Any]:
    """``jax.lax.scan`` over stacked blocks: ``body(block, carry, x) -> (carry, y)`` once per
    layer, with that layer's block and its slice of ``xs`` (leading axis: the layers; None:
    nothing per layer); returns the last carry and the stacked ``y``s. :func:`run_blocks`
    scans this way, with each layer's key/value cache among the ``xs`` when generating.

    ``layers``: a module built by :func:`jtp.parallel.stacked.stack`; its variables must all
    be ``nnx.Param``: a scan does not write state back. ``remat``: a policy for each trip.
    """
    graphdef, params, rest = nnx.split(layers, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "stacked layers hold variables other than nnx.Param "
            f"({sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})}); a scan cannot "
            "update them: build the blocks unrolled"
        )

    def step(carry: Any, inputs: tuple[nnx.State, Any]) -> tuple[Any, Any]:
        layer_params, x = inputs
        return body(nnx.merge(graphdef, layer_params, rest), carry, x)

    if remat_name(remat) != "none":  # inside a scan, CSE cannot merge the recomputation away
        step = jax.checkpoint(step, policy=checkpoint_policy(remat), prevent_cse=False)
    return jax.lax.scan(step, carry, (params, xs))
