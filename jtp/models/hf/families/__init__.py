"""The model families jtp's HF adapter reads and writes, one module each, and the few
functions through which the generic code (:mod:`jtp.models.hf.config`, ``load``, ``save``,
``peft``) consults them instead of branching on a family.

- :mod:`~jtp.models.hf.families.llama`: Llama, the family the others build on
- :mod:`~jtp.models.hf.families.mistral`: Mistral, a window on every layer
- :mod:`~jtp.models.hf.families.qwen`: Qwen2's q/k/v biases, Qwen3's q/k norms
- :mod:`~jtp.models.hf.families.gemma`: Gemma 2 / 3's fields, four norms per block, RoPE
  by layer type
- :mod:`~jtp.models.hf.families.phi3`: Phi-3's fused projections, its refusals
- :mod:`~jtp.models.hf.families.mixtral`: Mixtral, Mistral with experts in every layer
- :mod:`~jtp.models.hf.families.qwen_moe`: Qwen2-MoE (shared expert) and Qwen3-MoE, dense
  and sparse layers
- :mod:`~jtp.models.hf.families.olmoe`: OLMoE, experts and whole-projection q/k norms

(:mod:`~jtp.models.hf.families.experts` holds what the three MoE modules share.)

A family module declares ``ARCHITECTURES`` (name -> :class:`Architecture`: plain data the
generic code reads) and, where the family needs them, these functions, each taking the
architecture's name; a family without one gets the generic behaviour:

- ``check_config(hf, architecture)``: refusals read before any other field (Phi-3's);
- ``config_fields(hf, architecture, max_positions)``: :class:`LlamaConfig` fields it sets
  (returning ``rope_theta`` / ``rope_scaling`` / ``local_rope_theta`` replaces the generic
  RoPE read: Gemma 3);
- ``sliding_pattern(hf, architecture)``: for ``window_layers="pattern"``, every how many
  layers one is global;
- ``hf_fields(config, architecture)``: what its ``config.json`` says beyond Llama's
  (``rope_parameters`` replaces the generic one);
- ``tensor_map(config, architecture)``: its tensors (default Llama's,
  :func:`jtp.models.hf.names.tensor_map`);
- ``claim(config)``: the architecture of its that computes a model that came from no file,
  or None;
- ``refuse_peft(hf, what)``: a PEFT adapter has no mapping onto jtp's;

and, optionally, ``REFUSED``: architectures it knows and refuses, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from jtp.models.hf import names
from jtp.models.hf.families import gemma, llama, mistral, mixtral, olmoe, phi3, qwen, qwen_moe
from jtp.models.hf.families.architecture import Architecture
from jtp.models.hf.names import TensorMap
from jtp.models.llama import LlamaConfig

# In the order jtp.hf lists them; a family comes after those it builds on, so claim() asks
# the last first (a Qwen3 model is also a Llama with extras; Llama claims what is left; the
# MoE families claim only models with experts).
FAMILIES: tuple[ModuleType, ...] = (llama, mistral, qwen, gemma, phi3, mixtral, qwen_moe, olmoe)
ARCHITECTURES: dict[str, Architecture] = {
    name: arch for family in FAMILIES for name, arch in family.ARCHITECTURES.items()
}
REFUSED: dict[str, str] = {
    name: why for family in FAMILIES for name, why in getattr(family, "REFUSED", {}).items()
}
_FAMILY = {name: family for family in FAMILIES for name in family.ARCHITECTURES}


def _hook(architecture: str, name: str) -> Any:
    """The family's function ``name``, or None where it keeps the generic behaviour."""
    return getattr(_FAMILY[architecture], name, None)


def check_config(hf: Mapping[str, Any], architecture: str) -> None:
    """The family's own refusals of ``hf``, read before any other field."""
    if check := _hook(architecture, "check_config"):
        check(hf, architecture)


def config_fields(hf: Mapping[str, Any], architecture: str, max_positions: int) -> dict[str, Any]:
    """The :class:`LlamaConfig` fields the family reads from ``hf`` (windows aside)."""
    fields = _hook(architecture, "config_fields")
    return fields(hf, architecture, max_positions) if fields else {}


def sliding_pattern(hf: Mapping[str, Any], architecture: str) -> int:
    """Every how many layers one is global, for ``window_layers="pattern"``."""
    return _hook(architecture, "sliding_pattern")(hf, architecture)


def hf_fields(config: LlamaConfig, architecture: str) -> dict[str, Any]:
    """What the family's ``config.json`` of ``config`` says beyond Llama's fields."""
    fields = _hook(architecture, "hf_fields")
    return fields(config, architecture) if fields else {}


def tensor_map(config: LlamaConfig, architecture: str) -> list[TensorMap]:
    """Every (part of an) HF tensor of a checkpoint of ``config`` as ``architecture``, in
    HF's order (several entries share one ``hf`` name where the family fuses tensors)."""
    family_map = _hook(architecture, "tensor_map")
    return family_map(config, architecture) if family_map else names.tensor_map(config)


def default_architecture(config: LlamaConfig) -> str:
    """The HF class that computes what ``config`` does (for a model that came from no file);
    :func:`jtp.models.hf.config.describes` then checks that it does."""
    for family in reversed(FAMILIES):
        claim = getattr(family, "claim", None)
        if claim and (name := claim(config)):
            return name
    raise AssertionError("Llama claims every model")  # llama.claim never returns None


def refuse_peft(hf: Mapping[str, Any], what: str) -> None:
    """A ``ValueError`` when ``hf``'s family maps no PEFT adapter onto jtp's (Phi-3)."""
    name = (hf.get("architectures") or [None])[0]
    refuse = _hook(name, "refuse_peft") if isinstance(name, str) and name in _FAMILY else None
    if refuse:
        refuse(hf, what)
