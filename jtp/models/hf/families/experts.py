"""What the four mixture-of-experts families share (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
the config.json fields of their routers and experts, and their tensors' rows.

Not a family: the families' modules (:mod:`~jtp.models.hf.families.mixtral`,
:mod:`~jtp.models.hf.families.qwen_moe`, :mod:`~jtp.models.hf.families.olmoe`) call it.

Hub checkpoints keep one tensor per expert (``...experts.{e}.gate_proj.weight``, ``(F, D)``,
and so on), and transformers 5.25 writes them so too (its ``save_pretrained`` splits its
fused ``gate_up_proj`` back; its ``from_pretrained`` fuses them on the way in). jtp stacks
them: ``feed_forward.experts.w1`` / ``w3`` are ``(E, D, F)``, ``w2`` ``(E, F, D)``, each
expert a Flax ``(in, out)`` kernel, so each HF tensor is one expert's slice, transposed
(:attr:`jtp.models.hf.names.TensorMap.expert`): on load a device reads only the experts
(and rows) its block holds; on save one layer's experts are gathered once and written one
tensor per expert. The router's ``gate.weight`` ``(E, D)`` is ``router.kernel`` ``(D, E)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.hf.fields import positive_int
from jtp.models.hf.layer_types import pattern_of
from jtp.models.hf.names import Row
from jtp.models.llama import LlamaConfig


def _expert_rows(prefix: str, names: tuple[str, str, str], n_experts: int) -> tuple[Row, ...]:
    """The experts' rows: jtp's w1 (gate), w3 (up), w2 (down), each E tensors named
    ``{prefix}.experts.{e}.{name}.weight`` (all experts of one parameter in a row: save
    gathers each layer's parameter once)."""
    gate, up, down = names
    return tuple(
        (
            f"feed_forward.experts.{w}",
            f"{prefix}.experts.{{e}}.{name}.weight",
            True,
            False,
            n_experts,
        )
        for w, name in (("w1", gate), ("w3", up), ("w2", down))
    )


def sparse_rows(
    config: LlamaConfig,
    prefix: str = "mlp",
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> tuple[Row, ...]:
    """A sparse layer's feed-forward rows: the router (``{prefix}.gate.weight``), the
    experts, and Qwen2-MoE's shared expert and its gate where ``config`` has one."""
    rows: tuple[Row, ...] = (
        ("feed_forward.router.kernel", f"{prefix}.gate.weight", True, False),
        *_expert_rows(prefix, names, config.n_experts),
    )
    if config.shared_expert_hidden:
        rows += (
            (
                "feed_forward.shared_expert.w1.kernel",
                f"{prefix}.shared_expert.gate_proj.weight",
                True,
                False,
            ),
            (
                "feed_forward.shared_expert.w3.kernel",
                f"{prefix}.shared_expert.up_proj.weight",
                True,
                False,
            ),
            (
                "feed_forward.shared_expert.w2.kernel",
                f"{prefix}.shared_expert.down_proj.weight",
                True,
                False,
            ),
            (
                "feed_forward.shared_expert_gate.kernel",
                f"{prefix}.shared_expert_gate.weight",
                True,
                False,
            ),
        )
    return rows


def router_fields(
    hf: Mapping[str, Any], experts_fields: tuple[str, ...], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The :class:`LlamaConfig` fields of the router: ``n_experts`` (the first of
    ``experts_fields`` config.json has: transformers' config classes alias the two spellings,
    ``num_experts`` and ``num_local_experts``, through their ``attribute_map``),
    ``experts_per_token``, ``norm_topk_prob``, ``router_aux_loss_coef``, with the
    architecture's ``defaults`` (transformers' own) for what config.json omits."""
    coef = hf.get("router_aux_loss_coef", defaults["router_aux_loss_coef"])
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not coef >= 0:
        raise InputError(f"config.json: router_aux_loss_coef={coef!r} must be a number >= 0")
    norm = hf.get("norm_topk_prob", defaults.get("norm_topk_prob", False))
    if not isinstance(norm, bool):
        raise InputError(f"config.json: norm_topk_prob={norm!r} must be true or false")
    field = next((f for f in experts_fields if hf.get(f) is not None), experts_fields[0])
    return {
        "n_experts": positive_int(hf, field, defaults["num_experts"]),
        "experts_per_token": positive_int(
            hf, "num_experts_per_tok", defaults["num_experts_per_tok"]
        ),
        "norm_topk_prob": norm,
        "router_aux_loss_coef": float(coef),
    }


def qwen_moe_layers(hf: Mapping[str, Any], n_layers: int) -> tuple[bool, ...] | None:
    """Qwen-MoE's sparse layers as ``moe_layers``: layer ``i`` is sparse iff it is not in
    ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``
    (``Qwen2MoeDecoderLayer.__init__``); None when all are."""
    step = positive_int(hf, "decoder_sparse_step", 1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in dense
    ):
        raise InputError(f"config.json: mlp_only_layers={dense!r} must be a list of layer indices")
    flags = tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))
    if not any(flags):
        raise InputError(
            f"config.json: decoder_sparse_step={step}, mlp_only_layers={dense} leave no sparse "
            "layer; load it as the dense family (Qwen2 / Qwen3) instead"
        )
    return pattern_of(flags)


def qwen_layer_fields(config: LlamaConfig) -> dict[str, Any]:
    """``decoder_sparse_step`` and ``mlp_only_layers`` from which transformers builds
    ``config``'s sparse layers (the inverse of :func:`qwen_moe_layers`): the step that
    leaves the fewest layers to list (the smallest such), the others listed."""
    flags = config.layer_moe()
    best = None
    for step in range(1, len(flags) + 1):
        steps = [(i + 1) % step == 0 for i in range(len(flags))]
        if any(f and not s for f, s in zip(flags, steps, strict=True)):
            continue  # a sparse layer the step leaves dense: no list makes it sparse
        dense = [i for i, (f, s) in enumerate(zip(flags, steps, strict=True)) if s and not f]
        if best is None or len(dense) < len(best[1]):
            best = (step, dense)
    step, dense = best  # step 1 always fits
    return {"decoder_sparse_step": step, "mlp_only_layers": dense}


def moe_hf_fields(config: LlamaConfig, experts_field: str) -> dict[str, Any]:
    """The router's config.json fields of ``config`` (the inverse of :func:`router_fields`)."""
    return {
        experts_field: config.n_experts,
        "num_experts_per_tok": config.experts_per_token,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "output_router_logits": False,
    }


def refuse_window(hf: Mapping[str, Any], architecture: str, why: str) -> None:
    """An ``InputError`` where ``hf`` asks ``architecture`` for a sliding window jtp does not
    place as transformers does (``why``)."""
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise InputError(
            f"config.json: use_sliding_window={hf.get('use_sliding_window')!r} is not "
            f"supported for {architecture}: {why}"
        )
