"""Mistral (``MistralForCausalLM``): Llama with a sliding window on every layer.

Its one field beyond Llama's is ``sliding_window`` (default 4096), which transformers'
Mistral applies to every layer, ignoring ``layer_types``; its tensors are Llama's.
"""

from __future__ import annotations

from jtp.models.hf.families.architecture import Architecture
from jtp.models.llama import LlamaConfig

ARCHITECTURES = {
    "MistralForCausalLM": Architecture("mistral", False, False, 4096 * 32, sliding_window=4096),
}


def claim(config: LlamaConfig) -> str | None:
    """A windowed model of Llama's features is Mistral's."""
    return "MistralForCausalLM" if config.sliding_window is not None else None
