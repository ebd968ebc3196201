"""Llama (``LlamaForCausalLM``): jtp's decoder as it is, the family every other one builds on.

It adds nothing: its config.json fields are the generic ones (:mod:`jtp.models.hf.config`),
its tensors :data:`jtp.models.hf.names.BLOCK`'s, and it has no sliding window (transformers'
Llama ignores ``sliding_window`` and ``layer_types``). Its presets (tiny, llama3-8b,
llama3-70b) are :data:`jtp.models.llama.PRESETS`: sizes of the decoder, which needs no
checkpoint adapter to build one.
"""

from __future__ import annotations

from jtp.models.hf.families.architecture import Architecture
from jtp.models.llama import LlamaConfig

ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", False, False, 2048, window_layers="none"),
}


def claim(config: LlamaConfig) -> str | None:
    """Llama computes whatever no later family claims: the decoder without their features."""
    return "LlamaForCausalLM"
