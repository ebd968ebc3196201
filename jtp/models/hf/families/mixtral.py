"""Mixtral (``MixtralForCausalLM``): Mistral's attention with a mixture of experts in every
layer.

- config.json: ``num_local_experts`` (default 8), ``num_experts_per_tok`` (2),
  ``router_aux_loss_coef`` (0.001); each expert is ``intermediate_size`` wide (jtp's
  ``ffn_hidden``; ``moe_ffn_hidden`` 0); the gating is ``"mixtral"`` (softmax over the k
  chosen, weighted in float32: :mod:`jtp.models.moe`); ``sliding_window`` (default null),
  when set, applies to every layer, as Mistral's.
- tensors: ``block_sparse_moe.gate.weight`` (the router) and
  ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``: gate, up, down
  (:mod:`jtp.models.hf.families.experts`).
- refused: ``router_jitter_noise`` > 0 (transformers scales the router's input by uniform
  noise while training; jtp does not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jtp.errors import InputError
from jtp.models.hf import names
from jtp.models.hf.families import experts
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.names import TensorMap
from jtp.models.llama import LlamaConfig

ARCHITECTURE = "MixtralForCausalLM"
ARCHITECTURES = {
    # head_dim: MixtralConfig's stays null (the attention takes hidden / heads), so a
    # derived config.json writes one only where it is not that.
    ARCHITECTURE: Architecture(
        "mixtral", False, False, 4096 * 32, rms_norm_eps=1e-5, head_dim_field=False
    ),
}
DEFAULTS = {"num_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001}


def check_config(hf: Mapping[str, Any], architecture: str) -> None:
    """Refuse the router's training-time jitter."""
    jitter = hf.get("router_jitter_noise") or 0.0
    if jitter:
        raise InputError(
            f"config.json: router_jitter_noise={jitter!r} is not supported: transformers "
            "multiplies the router's input by uniform noise while training, jtp does not (set 0.0)"
        )


def config_fields(hf: Mapping[str, Any], architecture: str, max_positions: int) -> dict[str, Any]:
    """The router's fields; every layer sparse, experts as wide as ``intermediate_size``."""
    fields = experts.router_fields(hf, ("num_local_experts", "num_experts"), DEFAULTS)
    fields["norm_topk_prob"] = False  # Mixtral's weights always sum to 1 (gating "mixtral")
    return {**fields, "gating": "mixtral"}


def hf_fields(config: LlamaConfig, architecture: str) -> dict[str, Any]:
    """The router's fields; ``intermediate_size`` is the experts' width."""
    return {
        **experts.moe_hf_fields(config, "num_local_experts"),
        "intermediate_size": config.moe_ffn_hidden or config.ffn_hidden,
        "router_jitter_noise": 0.0,
    }


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Llama's attention rows and Mixtral's ``block_sparse_moe`` in every layer."""
    sparse = experts.sparse_rows(config, "block_sparse_moe", ("w1", "w3", "w2"))
    return names.tensor_map(config, names.BLOCK[:6] + sparse)


def claim(config: LlamaConfig) -> str | None:
    """A model with Mixtral's gating: Mixtral computes it where it has nothing else
    (:func:`jtp.models.hf.config.describes` checks)."""
    return ARCHITECTURE if config.n_experts and config.gating == "mixtral" else None
