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
    # Lightning's tensor-parallel Llama example (examples/pytorch/tensor_parallel) cut to
    # 46.4M parameters: its ModelArgs at dim 512, 4 layers, vocab 32000, RoPE base 10000;
    # SwiGLU width by its rule (4 x 512 x 2/3 rounded up to a multiple of 256 = 1536);
    # 8 heads of 64 (its default 32 would make heads of 16). Trains on CPU (docs/performance.md,
    # python -m jtp.bench lightning).
    "lightning-46m": LlamaConfig(
        vocab_size=32000,
        dim=512,
        n_layers=4,
        n_heads=8,
        n_kv_heads=8,
        ffn_hidden=1536,
        max_seq_len=2048,
        rope_theta=10000.0,
    ),
    # Mixtures of experts (jtp.models.moe; docs/moe.md). The tiny ones train on CPU in
    # seconds: 8 experts, top-2, every layer sparse (heads and experts divisible by 8).
    # Qwen3-MoE's routing: softmax over the experts, top-k, renormalised.
    "tiny-moe": LlamaConfig(
        n_experts=8,
        experts_per_token=2,
        moe_ffn_hidden=128,
        norm_topk_prob=True,
        gating="softmax_topk",
    ),
    # Mixtral's routing (softmax over the top-k logits), experts as wide as ffn_hidden.
    "tiny-mixtral": LlamaConfig(n_experts=8, experts_per_token=2, gating="mixtral"),
    # Shapes only, from the Hub's config.json (mistralai/Mixtral-8x7B-v0.1; 46.7B
    # parameters, 12.9B active per token).
    "mixtral-8x7b": LlamaConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,  # each expert's (intermediate_size)
        max_seq_len=32768,
        rope_theta=1e6,
        n_experts=8,  # num_local_experts
        experts_per_token=2,
        gating="mixtral",
        router_aux_loss_coef=0.02,
    ),
    # Qwen/Qwen3-30B-A3B's config.json (30.5B parameters, 3.3B active): q/k norms, head dim
    # 128 (not 2048 / 32), 128 experts of width 768, 8 per token renormalised, all sparse.
    "qwen3-30b-a3b": LlamaConfig(
        vocab_size=151936,
        dim=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        explicit_head_dim=128,
        qk_norm=True,
        ffn_hidden=6144,  # intermediate_size: no dense layer uses it (mlp_only_layers: [])
        max_seq_len=40960,
        rope_theta=1e6,
        norm_eps=1e-6,
        n_experts=128,
        experts_per_token=8,
        moe_ffn_hidden=768,
        norm_topk_prob=True,
        gating="softmax_topk",
        router_aux_loss_coef=0.001,
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
