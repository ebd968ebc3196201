"""The language-model objective the Llama task trains: next-token cross-entropy, plus, in a
model with experts, the router's auxiliary losses, and the routing metrics logged beside.

A mixture-of-experts model is trained as transformers trains one with
``output_router_logits=True``: ``loss = cross_entropy + router_aux_loss_coef *
load_balancing_loss`` (Switch Transformer's, over all sparse layers' routing), plus
``router_z_loss_coef * router_z_loss`` (ST-MoE) when that coefficient is > 0. Taken per
forward: with gradient accumulation each micro-batch's loss carries the auxiliary terms of
its own routing, as each of transformers' forwards does. Its routing counts are those of the
whole global micro-batch (:func:`jtp.training.steps.batch_total`), so a step computes the
same loss on any mesh. A dense model's loss is the cross-entropy alone: its program is what
it was before experts existed.

Metrics (per optimizer step, means over its micro-batches): ``lm_loss`` (the cross-entropy
alone, what ``jtp eval`` reports), ``aux_loss``, ``z_loss`` (when on), the expert load:
(token, expert) pairs per expert per sparse layer, ``expert_load_max`` over the experts,
``expert_load_mean`` (``N k / E``) and ``expert_load_ratio`` (max / mean: 1 is perfect
balance, ``E / k`` all pairs on one expert's share); with a capacity factor,
``dropped_pairs`` (summed over the sparse layers) and ``dropped_fraction`` (of all pairs).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.models.decoder import cross_entropy
from jtp.models.decoder_config import DecoderConfig
from jtp.models.moe import RouterStats, load_balancing_loss, router_z_loss
from jtp.training.module import StepOutput
from jtp.training.steps import batch_total

# The metrics moe_loss may return, in the order a report lists them.
ROUTER_METRICS = (
    "lm_loss",
    "aux_loss",
    "z_loss",
    "expert_load_max",
    "expert_load_mean",
    "expert_load_ratio",
    "dropped_pairs",
    "dropped_fraction",
)


def moe_loss(
    lm_loss: jax.Array, stats: RouterStats, config: DecoderConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, metrics)`` of a MoE model from its cross-entropy and its router stats summed
    over the sparse layers and the batch (the module docstring says which)."""
    aux = load_balancing_loss(stats)
    loss = lm_loss + config.router_aux_loss_coef * aux
    metrics = {"lm_loss": lm_loss, "aux_loss": aux}
    if config.router_z_loss_coef > 0:
        z = router_z_loss(stats)
        loss = loss + config.router_z_loss_coef * z
        metrics["z_loss"] = z
    n_sparse = sum(config.layer_moe())
    load_e = stats.expert_tokens / n_sparse  # (E,) pairs per expert, per sparse layer
    load_max, load_mean = jnp.max(load_e), jnp.mean(load_e)
    metrics.update(
        expert_load_max=load_max,
        expert_load_mean=load_mean,
        expert_load_ratio=load_max / load_mean,
    )
    if config.capacity_factor is not None:
        pairs = stats.tokens * config.experts_per_token  # over the sparse layers
        metrics.update(
            dropped_pairs=stats.dropped.astype(jnp.float32),
            dropped_fraction=stats.dropped / pairs,
        )
    return loss, metrics


Batch = jax.Array | Mapping[str, jax.Array]


def split_batch(batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(inputs (B, T), labels (B, T), keyword arguments of the model)`` of a next-token
    batch: (B, T + 1) token ids, or context parallelism's pieces
    (:func:`jtp.parallel.context.next_token_pieces`: inputs, labels and their positions,
    in the balanced order)."""
    if isinstance(batch, Mapping):
        return batch["inputs"], batch["labels"], {"positions_bt": batch["positions"]}
    return batch[:, :-1], batch[:, 1:], {}


def next_token_loss(model: nnx.Module, batch: Batch) -> StepOutput:
    """The Llama task's step: ``batch`` (B, T + 1) token ids (or the pieces of
    :func:`split_batch`), the model predicting each next one. A dense model: the mean
    cross-entropy; with experts (``model.config.n_experts``): ``(loss, metrics)`` of
    :func:`moe_loss`."""
    inputs_bt, labels_bt, kwargs = split_batch(batch)
    config = getattr(model, "config", None)
    if not getattr(config, "n_experts", 0):
        return cross_entropy(model(inputs_bt, **kwargs), labels_bt)
    logits_btv, stats = model(inputs_bt, router_stats=True, **kwargs)
    return moe_loss(cross_entropy(logits_btv, labels_bt), batch_total(stats), config)


def lm_loss(model: nnx.Module, batch: Batch) -> jax.Array:
    """The cross-entropy alone, also of a MoE model (its router stats dropped): what
    perplexity is taken from."""
    inputs_bt, labels_bt, kwargs = split_batch(batch)
    return cross_entropy(model(inputs_bt, **kwargs), labels_bt)
