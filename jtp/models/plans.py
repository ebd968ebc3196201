"""Ready-made plans for the models of this package (torchtitan's Llama plan, in jtp's terms).

A plan here is a :class:`jtp.TPPlan`: the usual ``{module_path: style}`` dict plus
activation rules for the model's ``shard_activation`` marks (used by sequence and loss
parallelism). Only this file, :mod:`jtp.mesh` and :mod:`jtp.parallel` spell mesh axis names.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jtp.errors import InputError
from jtp.mesh import DATA, EXPERT, TENSOR
from jtp.models.decoder_config import DecoderConfig
from jtp.parallel.experts import EXPERTS
from jtp.parallel.plan import TPPlan
from jtp.parallel.styles import ColwiseParallel, ParamSharding, RowwiseParallel


def feedforward() -> dict[str, ColwiseParallel | RowwiseParallel]:
    """The Lightning docs' plan for :class:`jtp.models.FeedForward`: ``w1``, ``w3`` column-wise,
    ``w2`` row-wise (one all-reduce over "tensor" in the forward)."""
    return {"w1": ColwiseParallel(), "w2": RowwiseParallel(), "w3": ColwiseParallel()}


def llama(
    config: DecoderConfig | None = None,
    *,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
    fsdp: bool = False,
    mesh: Mesh | None = None,
) -> TPPlan:
    """The Llama 3 plan.

    ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` column-wise (with their biases, if any) and ``wo``,
    ``w2`` row-wise: one all-reduce per attention and one per MLP. The token embedding is
    split on its vocabulary rows, the output projection on its vocabulary columns; norms
    (q/k norms included) are replicated.

    Args:
      config: the model's config, needed for tied embeddings and replicated kv heads.
        Tied (``config.tie_embeddings``): the one table is split on its vocabulary rows by
        the ``tok_embeddings`` entry, which is the split an untied output projection has, so
        the plan just has no ``output`` entry (there is no such module). ``kv_replicas`` > 1
        (:func:`replicate_kv`: a tensor axis wider than the kv heads): ``wk`` and ``wv`` are
        replicated, not split (a column split would cut heads in pieces); the model repeats
        each kv head and the "heads" rule then gives each device the one its queries use.
      sequence_parallel: between the tensor-parallel regions, keep the residual stream
        split on its sequence axis over "tensor" (the norms then run on a sequence shard, and
        each all-reduce becomes a reduce-scatter + all-gather pair).
      loss_parallel: keep the logits split on the vocabulary and compute the cross-entropy
        there (:func:`jtp.models.decoder.cross_entropy`), never gathering (B, T, V) logits.
      fsdp: the parameters are laid out with ``fsdp=True`` (the embedding table then has D on
        "data"): the lookup takes every token id and gives D split on "data", and the move
        to the batch split is spelled out (one all-to-all each way; without it XLA's
        partitioner of the backward scatter-add can fall back to all-gathering the whole
        (B, T, D) gradient over "data": "Involuntary full rematerialization").
      mesh: the mesh it will run on, for a model with experts: E/T whole experts per device
        of a tensor group where its tensor size divides E, else each expert's hidden width
        split (:func:`experts`); without it, E over "tensor".

    With experts (``config.n_experts``) the dense feed-forward entries are those of the
    dense layers, the shared expert (Qwen2-MoE) is laid out like one, the router is
    replicated, and the stacked experts and the "experts" rule follow :func:`experts`.
    """
    styles = {
        "tok_embeddings": RowwiseParallel(),
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(),
    }
    dense_mlp = config is None or not all(config.layer_moe())  # some layer has one
    if dense_mlp:
        styles |= {
            "layers.*.feed_forward.w1": ColwiseParallel(),
            "layers.*.feed_forward.w3": ColwiseParallel(),
            "layers.*.feed_forward.w2": RowwiseParallel(),
        }
    if config is None or config.kv_replicas == 1:
        styles |= {
            "layers.*.attention.wk": ColwiseParallel(),
            "layers.*.attention.wv": ColwiseParallel(),
        }
    if config is None or not config.tie_embeddings:
        styles["output"] = ColwiseParallel()
    activations = {
        "residual": P(DATA, TENSOR, None) if sequence_parallel else P(DATA, None, None),
        "tp_input": P(DATA, None, None),  # normed input of attention / MLP / output: whole T
        "heads": P(DATA, None, TENSOR, None),  # q, k, v, out: (B, T, heads, E) split by head
        "logits": P(DATA, None, TENSOR) if loss_parallel else P(DATA, None, None),
    }
    if dense_mlp:
        activations["ffn_hidden"] = P(DATA, None, TENSOR)  # SwiGLU hidden (B, T, F) like w1/w3
    if fsdp:  # the lookup's layout under the table's (V on "tensor", D on "data") split
        activations |= {"tokens": P(None, None), "embedding": P(None, None, DATA)}
    if config is not None and config.n_experts:
        styles, activations = _with_experts(config, styles, activations, mesh)
    return TPPlan(styles, activations)


def experts(n_experts: int, mesh: Mesh | None) -> P:
    """Where the stacked experts go, as the layout of ``w1`` (E, D, F): ``P("tensor", None,
    None)`` (each device of a tensor group holds E/T whole experts) where the tensor size
    divides E or no mesh is given, else ``P(None, None, "tensor")`` (every expert's hidden
    width split, as a dense feed-forward's). Either way a MoE layer's forward costs one
    all-reduce over "tensor" (:mod:`jtp.parallel.experts`).

    On a mesh with an "expert" axis: ``P("expert", None, "tensor")`` (``P("expert", None,
    None)`` without a tensor split): E/X whole experts per device along "expert", their
    hidden width split over "tensor"; each pair travels to its expert's device and back by
    two all-to-alls over "expert" (:mod:`jtp.parallel.expert_exchange`), the partial
    outputs meet in the same one all-reduce over "tensor"."""
    t = 1 if mesh is None else int(mesh.shape[TENSOR])
    if mesh is not None and EXPERT in mesh.shape:
        return P(EXPERT, None, TENSOR if t > 1 else None)
    return P(TENSOR, None, None) if n_experts % t == 0 else P(None, None, TENSOR)


def _with_experts(
    config: DecoderConfig, styles: dict, activations: dict, mesh: Mesh | None
) -> tuple[dict, dict]:
    """The plan's entries for a model with experts (:func:`llama`): the stacked experts,
    the "experts" rule, and the shared expert laid out as a dense feed-forward."""
    spec = experts(config.n_experts, mesh)
    styles["layers.*.feed_forward.experts"] = ParamSharding(
        {"w1": spec, "w3": spec, "w2": P(spec[0], spec[2], spec[1])}
    )
    if config.shared_expert_hidden:
        styles |= {
            "layers.*.feed_forward.shared_expert.w1": ColwiseParallel(),
            "layers.*.feed_forward.shared_expert.w3": ColwiseParallel(),
            "layers.*.feed_forward.shared_expert.w2": RowwiseParallel(),
        }
        activations = activations | {"ffn_hidden": P(DATA, None, TENSOR)}
    return styles, activations | {EXPERTS: spec}


def replicate_kv(config: DecoderConfig, mesh: Mesh | int) -> DecoderConfig:
    """``config`` with the ``kv_replicas`` the tensor size of ``mesh`` (or the size itself)
    needs: ``tensor / n_kv_heads`` when the tensor axis is wider than the kv heads and a
    multiple of them (Qwen2.5-7B's 4 kv heads on tensor 8: 2), else 1.

    Each device then holds the whole ``wk`` / ``wv`` (K heads, replicated: a column split
    would cut heads in pieces) but computes, ropes, attends with and caches only the kv
    head its query heads use; the backward sums the copies' gradients into the one
    parameter (one all-reduce of its gradient over "tensor"), so the model computes and
    learns exactly what the unsharded one does. Recomputed for every mesh (a checkpoint's
    recorded value is not carried over): parameters and results do not depend on it.
    """
    t = mesh if isinstance(mesh, int) else int(mesh.shape[TENSOR])
    k = config.n_kv_heads
    r = t // k if t > k and t % k == 0 else 1
    return config if config.kv_replicas == r else dataclasses.replace(config, kv_replicas=r)


def check_llama(
    config: DecoderConfig,
    mesh: Mesh,
    *,
    seq_len: int | None = None,
    sequence_parallel: bool = False,
) -> None:
    """Raise a ``ValueError`` naming the numbers when the Llama plan cannot apply."""
    if EXPERT in mesh.shape:
        x = int(mesh.shape[EXPERT])
        if not config.n_experts:
            raise InputError(
                f"llama plan: mesh axis 'expert' of size {x} splits a mixture-of-experts "
                "model's experts, but this model is dense (n_experts=0); drop the expert axis "
                "(--expert-parallel 1) or use a MoE model"
            )
        if config.n_experts % x:
            sizes = [k for k in range(1, config.n_experts + 1) if config.n_experts % k == 0]
            raise InputError(
                f"llama plan: n_experts={config.n_experts} is not divisible by mesh axis "
                f"'expert' of size {x}; each device must hold whole experts (use an expert "
                f"size in {sizes})"
            )
    t = int(mesh.shape[TENSOR])
    if config.n_heads % t:
        raise InputError(
            f"llama plan: n_heads={config.n_heads} is not divisible by mesh axis 'tensor' of "
            f"size {t}; each device must hold whole heads (use a tensor size dividing "
            f"{config.n_heads})"
        )
    kv = config.cached_kv_heads
    if kv % t:
        fits = replicate_kv(config, t).cached_kv_heads % t == 0
        raise InputError(
            f"llama plan: n_kv_heads={config.n_kv_heads} (x kv_replicas={config.kv_replicas}) "
            f"is not divisible by mesh axis 'tensor' of size {t}; each device must hold whole "
            + (
                f"kv heads: set kv_replicas={t // config.n_kv_heads} "
                "(jtp.plans.replicate_kv(config, mesh) does; jtp.hf.load_pretrained and "
                "python -m jtp.train do it for you)"
                if fits
                else f"kv heads: use a tensor size dividing {config.n_kv_heads} or a multiple "
                f"of it dividing n_heads={config.n_heads}"
            )
        )
    if sequence_parallel and seq_len is not None and seq_len % t:
        raise InputError(
            f"llama plan with sequence_parallel: sequence length {seq_len} is not divisible "
            f"by mesh axis 'tensor' of size {t}"
        )
