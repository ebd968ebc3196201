"""The pure step functions the trainer compiles: one train step, one eval step.

Kept apart from the loop so they read as what XLA sees: a function of (params, optimizer
state, other model state, batches) with no Python state, traced once per fit.

Gradient accumulation happens *inside* the train step: it takes the k loader batches of
one optimizer step and loops over them in the compiled program. How the gradients cross the
"data" axis is the choice that matters (see :data:`GRAD_REDUCE`):

- ``"per_step"``: each data rank accumulates its own gradient over the k micro-batches
  (a ``jax.vmap`` over data ranks with ``spmd_axis_name="data"``: nothing crosses "data"
  inside the loop), then one all-reduce (or reduce-scatter) after it. Data-axis bytes per
  optimizer step are those of k = 1, whatever k; the cost is one unreduced, param-sized
  gradient per device, which under fsdp is larger than the fsdp shard. On a mesh with an
  expert axis a data rank's rows stay split over "expert" inside the loop (a MoE layer
  exchanges its tokens over that axis, so it cannot be a vmapped one): the gradients of
  the parameters not split on "expert" are reduced over it per micro-batch.
- ``"per_micro_batch"``: every micro-batch's gradient is reduced into the parameters'
  layout inside the loop (k reductions per step); under fsdp the accumulator then stays
  fsdp-sharded, which is why it is fsdp's default (as in torchtitan).

A loss that is not a mean over rows (a mixture of experts' load-balancing loss, taken from
the routing counts of the whole batch) asks for its counts with :func:`batch_total`: under
``"per_step"`` each data rank runs its rows alone, and the counts are summed over the ranks
there, so every micro-batch's loss is that of its whole global batch, as without the
per-rank loop.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.mesh import DATA
from jtp.parallel.activations import per_data_rank
from jtp.training.module import StepOutput
from jtp.training.precision import apply_compute_dtype, cast_batch, cast_floats, compute_params

GRAD_REDUCE = ("per_step", "per_micro_batch")

# The vmap axis of the per-data-rank loop ("per_step" accumulation), and whether the code
# being traced runs inside it (then batch_total sums over it).
_RANKS = "data_ranks"
_PER_RANK = contextvars.ContextVar("jtp_per_rank", default=False)

Step = Callable[[Any, Any, Any, Sequence[Any]], tuple[Any, Any, Any, dict[str, jax.Array]]]


def _compute_model(graphdef: nnx.GraphDef, params: Any, rest: Any, precision: str) -> nnx.Module:
    """The model a step runs: its parameters in the compute dtype, and every stock Flax
    layer told to compute in it (:mod:`jtp.training.precision`)."""
    model = nnx.merge(graphdef, compute_params(params, precision), rest)
    return apply_compute_dtype(model, precision)


def batch_total(tree: Any) -> Any:
    """Sums over the rows a step's hook sees (a pytree of them) made sums over the whole
    global (micro-)batch: inside the per-data-rank loop of ``grad_reduce="per_step"``
    accumulation, where each rank traces its own rows, a ``psum`` over the ranks (whose
    gradient is the whole batch's too); elsewhere the hook already sees the global batch,
    and ``tree`` is returned as it is. For losses that are not means over rows, e.g.
    :func:`jtp.models.moe.load_balancing_loss` of summed router stats."""
    return jax.lax.psum(tree, _RANKS) if _PER_RANK.get() else tree


@contextlib.contextmanager
def _per_rank() -> Iterator[None]:
    token = _PER_RANK.set(True)
    try:
        with per_data_rank():
            yield
    finally:
        _PER_RANK.reset(token)


def split_output(out: StepOutput) -> tuple[jax.Array, dict[str, jax.Array]]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum g**2) over a whole (sharded) gradient tree, in float32."""
    return optax.tree.norm(cast_floats(tree, jnp.float32))


def _mean0(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _per_rank_spec(sharding: NamedSharding) -> NamedSharding:
    """A per-data-rank gradient ``(d, *param)``: rank on "data", the rest like the param
    without "data" (each device holds its rank's whole tensor-shard of the gradient)."""
    rest = (_without(a, (DATA,)) for a in sharding.spec)
    return NamedSharding(sharding.mesh, P(DATA, *rest))


def _without(entry: Any, axes: tuple[str, ...]) -> Any:
    """A spec entry with the rank axes taken out (``None`` when nothing is left)."""
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    kept = tuple(a for a in names if a not in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def make_train_step(
    graphdef: nnx.GraphDef,
    param_shardings: Any,
    training_step: Callable[[nnx.Module, Any], StepOutput],
    tx: optax.GradientTransformation,
    *,
    precision: str = "32-true",
    track_grad_norm: bool = False,
    accumulate: int = 1,
    grad_reduce: str = "per_step",
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> Step:
    """``(params, opt_state, rest, batches) -> (params, opt_state, rest, metrics)``.

    ``batches`` holds the ``accumulate`` global batches of one optimizer step; the update
    equals one step on their concatenation (mean loss, mean gradient). Only the parameters
    ``trainable`` selects (all by default; ``nnx.LoRAParam`` for LoRA) are differentiated
    and updated, and ``opt_state`` is ``tx``'s state of those alone; the others pass through
    the step unchanged (donated and returned, so XLA aliases them: no copy).
    """
    if grad_reduce not in GRAD_REDUCE:
        raise ValueError(f"grad_reduce={grad_reduce!r} must be one of {GRAD_REDUCE}")
    param_shardings = nnx.split_state(param_shardings, trainable, ...)[0]  # of trained ones

    def grads_of(params, frozen, rest, batch):
        def loss_fn(p):
            model = _compute_model(graphdef, nnx.merge_state(p, frozen), rest, precision)
            loss, metrics = split_output(training_step(model, cast_batch(batch, precision)))
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return loss.astype(jnp.float32), (metrics, new_rest)

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, **metrics}, new_rest

    def accumulated(params, frozen, rest, micro):
        """Sum of gradients and metrics over the leading (micro-batch) axis of ``micro``."""

        def body(carry, batch):
            acc, metric_sum, rest = carry
            grads, metrics, rest = grads_of(params, frozen, rest, batch)
            if grad_reduce == "per_micro_batch":  # reduce into the params' layout now
                grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            acc = jax.tree.map(jnp.add, acc, grads)
            return (acc, jax.tree.map(jnp.add, metric_sum, metrics), rest), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grads_of, params, frozen, rest, first)[1]
        metric_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zero = jax.tree.map(jnp.zeros_like, params)
        (acc, metric_sum, rest), _ = jax.lax.scan(body, (zero, metric_zero, rest), micro)
        return acc, metric_sum, rest

    def gradients(params, frozen, rest, batches):
        if accumulate == 1:
            return grads_of(params, frozen, rest, batches[0])
        micro = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)  # (k, B, ...)
        k = accumulate
        if grad_reduce == "per_micro_batch":
            acc, metric_sum, rest = accumulated(params, frozen, rest, micro)
            return jax.tree.map(lambda g: g / k, acc), _scaled(metric_sum, 1 / k), rest
        n_data = _data_size(param_shardings)
        # (k, B, ...) -> (d, k, B/d, ...): data rank r holds rows r*B/d:(r+1)*B/d of every
        # micro-batch, which is exactly the rows its devices already hold (no data moves).
        by_rank = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(k, n_data, -1, *x.shape[2:]), 0, 1), micro
        )

        def rank_step(rank_micro):
            with _per_rank():
                return accumulated(params, frozen, rest, rank_micro)

        acc_d, metric_d, rest_d = jax.vmap(rank_step, spmd_axis_name=DATA, axis_name=_RANKS)(
            by_rank
        )
        acc_d = jax.lax.with_sharding_constraint(
            acc_d, jax.tree.map(_per_rank_spec, param_shardings)
        )
        grads = jax.tree.map(lambda g: g / k, _mean0(acc_d))  # the one reduction over "data"
        rest = jax.tree.map(lambda x: x[0], rest_d)  # every rank advanced it alike
        return grads, _scaled(_mean0(metric_d), 1 / k), rest

    def train_step(all_params, opt_state, rest, batches):
        params, frozen = nnx.split_state(all_params, trainable, ...)
        grads, metrics, new_rest = gradients(params, frozen, rest, batches)
        # Keep gradients in the parameters' layout: with fsdp this makes XLA reduce-scatter
        # them over "data" instead of all-reducing full copies.
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        # Finish every read of the old parameters (forward and backward) before the
        # in-place update may start. Without this, a loss whose gradient does not depend
        # on the forward (the docs' ``output.sum()``) lets XLA schedule an update before
        # a forward matmul, and it copies the donated parameter to keep it alive.
        metrics, grads = jax.lax.optimization_barrier((metrics, grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics.update(learning_rates(opt_state))
        if track_grad_norm:
            metrics["grad_norm"] = global_norm(grads)
        return nnx.merge_state(params, frozen), opt_state, new_rest, metrics

    return train_step


def learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    """The learning rate this update applied, read from the optimizer state: ``{"lr": ...}``
    for an optimizer built with ``optax.inject_hyperparams`` (``lr_0``, ``lr_1``, ... when
    several are); ``{}`` for one that keeps its rate out of the state (nothing to read, so
    nothing is logged rather than a guess)."""
    found = [
        s.hyperparams["learning_rate"]
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
        if isinstance(getattr(s, "hyperparams", None), dict) and "learning_rate" in s.hyperparams
    ]
    if len(found) == 1:
        return {"lr": found[0]}
    return {f"lr_{i}": lr for i, lr in enumerate(found)}


def _scaled(tree: Any, factor: float) -> Any:
    return jax.tree.map(lambda x: x * factor, tree)


def _data_size(param_shardings: Any) -> int:
    leaf = jax.tree.leaves(param_shardings)[0]
    return int(leaf.mesh.shape[DATA])


def make_eval_step(
    graphdef: nnx.GraphDef,
    step: Callable[[nnx.Module, Any], StepOutput],
    *,
    precision: str = "32-true",
) -> Callable:
    """``(params, rest, batch) -> {"loss": ..., **metrics}`` without gradients."""

    def eval_step(params, rest, batch):
        model = _compute_model(graphdef, params, rest, precision)
        loss, metrics = split_output(step(model, cast_batch(batch, precision)))
        return {"loss": loss.astype(jnp.float32), **metrics}

    return eval_step
