"""Llama 3: the decoder under the name users know, and Llama 3's presets.

:class:`Llama` is :class:`jtp.models.decoder.Decoder` and :class:`LlamaConfig` is
:class:`jtp.models.decoder_config.DecoderConfig` (the same classes: its defaults are
Llama 3's); the decoder's other names are re-exported so that ``from jtp.models.llama
import ...`` keeps working. Mistral, Qwen, Phi-3 and Gemma are the same decoder with other
config fields (:mod:`jtp.models.hf` sets them from a checkpoint's ``config.json``).
"""

from __future__ import annotations

from jtp.models.decoder import (
    Attention,
    Decoder,
    TransformerBlock,
    cross_entropy,
    scale_embeddings,
    soft_cap,
)
from jtp.models.decoder_config import DecoderConfig

Llama = Decoder
LlamaConfig = DecoderConfig

PRESETS = {
    # Trains on CPU in seconds; heads divisible by 8 so every test mesh applies.
    "tiny": LlamaConfig(),
    # Shapes only: used abstractly (nnx.eval_shape + AOT compile), never allocated on CPU.
    "llama3-8b": LlamaConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        max_seq_len=8192,
    ),
    "llama3-70b": LlamaConfig(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden=28672,
        max_seq_len=8192,
    ),
}

__all__ = [
    "PRESETS",
    "Attention",
    "Decoder",
    "DecoderConfig",
    "Llama",
    "LlamaConfig",
    "TransformerBlock",
    "cross_entropy",
    "scale_embeddings",
    "soft_cap",
]
