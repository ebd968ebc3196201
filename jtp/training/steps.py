"""The pure step functions the trainer compiles: one train step, one eval step.

Kept apart from the loop so they read as what XLA sees: a function of (params, optimizer
state, other model state, batch) with no Python state, traced once per fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jtp.training.module import StepOutput

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast the floating leaves of ``tree`` to ``dtype`` (integers, keys untouched)."""

    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def compute_params(params: Any, precision: str) -> Any:
    """The parameters a step computes with: bf16 copies under "bf16-mixed" (the cast's
    transpose sends fp32 gradients back to the fp32 parameters)."""
    return cast_floats(params, jnp.bfloat16) if precision == "bf16-mixed" else params


def split_output(out: StepOutput) -> tuple[jax.Array, dict[str, jax.Array]]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum g**2) over a whole (sharded) gradient tree, in float32."""
    return optax.tree.norm(cast_floats(tree, jnp.float32))


def make_train_step(
    graphdef: nnx.GraphDef,
    param_shardings: Any,
    training_step: Callable[[nnx.Module, Any], StepOutput],
    tx: optax.GradientTransformation,
    *,
    precision: str = "32-true",
    track_grad_norm: bool = False,
) -> Callable:
    """``(params, opt_state, rest, batch) -> (params, opt_state, rest, metrics)``."""

    def train_step(params, opt_state, rest, batch):
        def loss_fn(p):
            model = nnx.merge(graphdef, compute_params(p, precision), rest)
            loss, metrics = split_output(training_step(model, batch))
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return loss.astype(jnp.float32), (metrics, new_rest)

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # Keep gradients in the parameters' layout: with fsdp this makes XLA reduce-scatter
        # them over "data" instead of all-reducing full copies.
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        # Finish every read of the old parameters (forward and backward) before the
        # in-place update may start. Without this, a loss whose gradient does not depend
        # on the forward (the docs' ``output.sum()``) lets XLA schedule an update before
        # a forward matmul, and it copies the donated parameter to keep it alive.
        loss, metrics, grads = jax.lax.optimization_barrier((loss, metrics, grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, **metrics}
        if track_grad_norm:
            metrics["grad_norm"] = global_norm(grads)
        return params, opt_state, new_rest, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    step: Callable[[nnx.Module, Any], StepOutput],
    *,
    precision: str = "32-true",
) -> Callable:
    """``(params, rest, batch) -> {"loss": ..., **metrics}`` without gradients."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, compute_params(params, precision), rest)
        loss, metrics = split_output(step(model, batch))
        return {"loss": loss.astype(jnp.float32), **metrics}

    return eval_step
