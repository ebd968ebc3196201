"""Where a mixture-of-experts layer's experts run: the "experts" activation rule.

A MoE layer (:class:`jtp.models.moe.MoEFeedForward`) is single-device code: it routes its
tokens and hands the expert work to :func:`place_experts`, with the pure functions that do
it (:class:`ExpertMath`). Outside a plan that function just runs them on every token. Under
a plan whose activation rules carry ``"experts"`` (the ``PartitionSpec`` of the stacked
``w1`` (E, D, F), as the plan lays out the parameters), it runs them inside one
``jax.shard_map`` over the whole mesh, each device on its own tokens:

- tokens stay split over the batch axes (:func:`jtp.mesh.batch_axis_names`, "data"
  left to the enclosing ``vmap`` inside :func:`jtp.parallel.activations.per_data_rank`),
  then over "context" on a mesh with that axis; without this, the routing's sort over all
  tokens would make XLA gather every token of the batch onto every device. The layer's
  (B, T) is flattened to N = B * T tokens (B major): with one row per batch rank, N split
  over (batch axes, "context") is exactly each device's piece of its sequence and nothing
  moves; with b > 1 rows, a device's piece is b runs of T / C tokens while N's split gives
  it b / C whole rows, so XLA exchanges the tokens over "context" (an all-to-all) on the
  way in and out (measured: that, rather than gathers, is what the partitioner emits;
  splitting (B, T) directly made it gather the router's input instead);
- ``P("tensor", None, None)``: each device of a tensor group holds E/T whole experts and
  multiplies only the (token, expert) pairs routed to them (its group's tokens, replicated
  over "tensor"); the partial outputs meet in one ``psum`` over "tensor", the all-reduce a
  dense row-parallel feed-forward also costs; no expert weight moves;
- ``P(None, None, "tensor")`` (fewer experts than devices in the group): every device holds
  every expert's F/T slice of the hidden width and multiplies every pair with it; the same
  one ``psum``;
- an "expert" axis on E (``P("expert", ...)``): each pair goes to the device holding its
  expert and back by two all-to-alls over "expert" (:mod:`jtp.parallel.expert_exchange`).

Dropped pairs (a capacity factor) are counted per device and summed. A capacity then
applies per device's tokens (GShard's groups), not per global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jtp.mesh import CONTEXT, DATA, EXPERT, TENSOR, batch_axis_names
from jtp.parallel.activations import active_rule
from jtp.parallel.expert_exchange import exchange

EXPERTS = "experts"  # the activation rule's name

# The model's pure pieces (jtp.models.moe): each takes the weights as arguments so that
# they run unchanged on a device's own slice of them.
Local = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class ExpertMath:
    """What a MoE layer computes, as functions of arrays (no module state).

    ``local(x_nd, weights_nk, experts_nk, w1, w2, w3, first_expert) -> (y_nd, dropped)``:
    every token through those of its experts numbered ``first_expert ..
    first_expert + w1.shape[0] - 1`` (the others contribute 0), weighted and summed over k;
    ``grouped(x_md, group_sizes_e, w1, w2, w3) -> y_md``: rows sorted by expert through
    their experts; ``combine(y_nkd, weights_nk) -> y_nd``: the weighting and sum over k.
    """

    local: Local
    grouped: Callable[..., jax.Array]
    combine: Callable[[jax.Array, jax.Array], jax.Array]
    n_experts: int
    capacity_factor: float | None


def per_token(fn: Callable[..., Any], *arrays: jax.Array) -> Any:
    """``fn`` of arrays whose leading dimension is the tokens (N, ...), computed where the
    tokens are under the "experts" rule: each device on its own (XLA's partitioner gathers
    the whole batch for a top-k over a token-split (N, E): seen on CPU); ``fn(*arrays)``
    without the rule."""
    found = active_rule(EXPERTS)
    if found is None:
        return fn(*arrays)
    mesh, _, data_mapped = found
    tokens = P(_token_axes(mesh, data_mapped) or None)
    out = jax.eval_shape(fn, *arrays)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(tokens for _ in arrays),
        out_specs=jax.tree.map(lambda _: tokens, out),
    )(*arrays)


def _token_axes(mesh: Mesh, data_mapped: bool) -> tuple[str, ...]:
    """The axes a layer's N = B * T tokens are split over in ``mesh``: the batch axes
    ("data" left to an enclosing per-data-rank vmap), then "context" (each sequence's
    pieces) where the mesh has it."""
    batch = (a for a in batch_axis_names(mesh) if not (data_mapped and a == DATA))
    return (*batch, *((CONTEXT,) if CONTEXT in mesh.axis_names else ()))


def place_experts(
    math: ExpertMath,
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The layer's expert output (N, D) and dropped pairs (int32), placed by the active
    "experts" rule (module docstring); without one, ``math.local`` on every token."""
    found = active_rule(EXPERTS)
    if found is None:
        return math.local(x_nd, weights_nk, experts_nk, w1, w2, w3, 0)
    mesh, spec, data_mapped = found
    if len(spec) != 3:
        raise ValueError(
            f"activation rule {EXPERTS!r}: spec {spec} must have 3 entries, the layout of "
            "the stacked w1 (E, D, F)"
        )
    e_axes, d_axes, f_axes = (_axes(entry) for entry in spec)
    if d_axes:
        raise ValueError(f"activation rule {EXPERTS!r}: {spec} splits D; only E and F may be")
    axes = _token_axes(mesh, data_mapped)
    if data_mapped:
        # Under the per-data-rank vmap an unbatched operand of shard_map counts as
        # replicated over "data", and its gradient comes back summed over the ranks (jax
        # 0.12), where each rank's own is meant: tie the weights to this rank's tokens so
        # they are batched like them (a copy of the device's slice; no data moves).
        zero = (x_nd[0, 0] * 0).astype(w1.dtype)
        w1, w2, w3 = w1 + zero, w2 + zero, w3 + zero
    w13_spec, w2_spec = P(*spec), P(spec[0], spec[2], spec[1])
    tokens = P(axes or None)

    def body(x_nd, weights_nk, experts_nk, w1, w2, w3):
        if EXPERT in e_axes:
            y_nd, dropped = exchange(
                x_nd,
                weights_nk,
                experts_nk,
                w1,
                w2,
                w3,
                grouped=math.grouped,
                combine=math.combine,
                axis=EXPERT,
                n_experts=math.n_experts,
                capacity_factor=math.capacity_factor,
            )
            # The exchange returns its axis's total on every device of it: count it once.
            dropped = jnp.where(jax.lax.axis_index(EXPERT) == 0, dropped, 0)
        else:
            first = jax.lax.axis_index(TENSOR) * w1.shape[0] if TENSOR in e_axes else 0
            y_nd, dropped = math.local(x_nd, weights_nk, experts_nk, w1, w2, w3, first)
        if TENSOR in e_axes + f_axes:  # partial sums of a tensor group's pairs
            y_nd = jax.lax.psum(y_nd, TENSOR)
        if TENSOR in e_axes:  # each device dropped pairs of its own experts only
            dropped = jax.lax.psum(dropped, TENSOR)
        return y_nd, dropped.reshape(1)

    y_nd, dropped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, w13_spec, w2_spec, w13_spec),
        out_specs=(tokens, tokens),  # dropped: one count per device
    )(x_nd, weights_nk, experts_nk, w1, w2, w3)
    return y_nd, jnp.sum(dropped)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)
