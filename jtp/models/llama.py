"""A Llama-3-style decoder in plain single-device Flax NNX.

Token embedding, pre-norm blocks of grouped-query attention with RoPE (theta 500000) and a
SwiGLU feed-forward (``w1``, ``w2``, ``w3``: jtp's :class:`FeedForward`), a final RMSNorm and
an output projection. No mesh, no axis names: a plan shards the weights from outside
(:func:`jtp.plans.llama`), and four ``shard_activation`` marks ("residual", "tp_input",
"heads", "logits") let a plan lay out activations for sequence and loss parallelism; they do nothing
without one.

Dimension letters in names and comments: B batch, T query positions, S key positions,
D model width, H query heads, K kv heads, R = H / K queries per kv head, E head dim, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.models.feedforward import FeedForward
from jtp.parallel.activations import shard_activation


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 512  # V
    dim: int = 128  # D, model width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 16  # H, query heads
    n_kv_heads: int = 8  # K, key/value heads (grouped-query attention; divides n_heads)
    ffn_hidden: int = 384  # SwiGLU hidden width
    max_seq_len: int = 64  # longest sequence the RoPE table covers
    rope_theta: float = 500000.0  # Llama 3's RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    remat: bool = False  # recompute each block in the backward pass (activation checkpointing)

    @property
    def head_dim(self) -> int:  # E
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )

    def num_params(self) -> int:
        d, h, kv, e = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * e * 2 + d * kv * e * 2
        block = attn + 3 * d * self.ffn_hidden + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * block + d


PRESETS = {
    # Trains on CPU in seconds; heads divisible by 8 so every test mesh applies.
    "tiny": LlamaConfig(),
    # Shapes only: used abstractly (nnx.eval_shape + AOT compile), never allocated on CPU.
    "llama3-8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_hidden=14336, max_seq_len=8192,
    ),
    "llama3-70b": LlamaConfig(
        vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
        ffn_hidden=28672, max_seq_len=8192,
    ),
}  # fmt: skip


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, each (T, E/2), in float32."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # (T, E/2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthe: jax.Array, cos_tf: jax.Array, sin_tf: jax.Array) -> jax.Array:
    """Rotate consecutive feature pairs (x[2i], x[2i+1]) by position-dependent angles."""
    b, t, h, e = x_bthe.shape
    pairs = x_bthe.astype(jnp.float32).reshape(b, t, h, e // 2, 2)  # (B, T, H, E/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (B, T, H, E/2) each
    cos, sin = cos_tf[None, :t, None, :], sin_tf[None, :t, None, :]  # (1, T, 1, E/2)
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(b, t, h, e).astype(x_bthe.dtype)  # (B, T, H, E)


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs)


class Attention(nnx.Module):
    """Causal grouped-query attention: K kv heads, each shared by R = H / K query heads."""

    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = _linear(c.dim, c.n_heads * c.head_dim, rngs)
        self.wk = _linear(c.dim, c.n_kv_heads * c.head_dim, rngs)
        self.wv = _linear(c.dim, c.n_kv_heads * c.head_dim, rngs)
        self.wo = _linear(c.n_heads * c.head_dim, c.dim, rngs)

    def __call__(self, x_btd: jax.Array, cos_tf: jax.Array, sin_tf: jax.Array) -> jax.Array:
        b, t, _ = x_btd.shape
        h, k, e = self.n_heads, self.n_kv_heads, self.head_dim
        q_bthe = self.wq(x_btd).reshape(b, t, h, e)  # (B, T, H, E)
        k_bske = self.wk(x_btd).reshape(b, t, k, e)  # (B, S, K, E), S = T
        v_bske = self.wv(x_btd).reshape(b, t, k, e)  # (B, S, K, E)
        # "heads": tensor parallelism splits attention by heads (q, k, v alike).
        q_bthe = shard_activation(apply_rope(q_bthe, cos_tf, sin_tf), "heads")
        k_bske = shard_activation(apply_rope(k_bske, cos_tf, sin_tf), "heads")
        v_bske = shard_activation(v_bske, "heads")
        # Grouped-query attention: query head h uses kv head h // R (Llama's repeat_kv order).
        # jax.nn.dot_product_attention picks a fused kernel where the backend has one (cuDNN
        # flash attention on GPU) and XLA's reference path elsewhere.
        out_bthe = jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, is_causal=True)
        out_bthe = shard_activation(out_bthe, "heads")  # keeps the backward split by head too
        return self.wo(out_bthe.reshape(b, t, h * e))  # (B, T, D)


class TransformerBlock(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.RMSNorm(c.dim, epsilon=c.norm_eps, rngs=rngs)
        self.attention = Attention(c, rngs=rngs)
        self.ffn_norm = nnx.RMSNorm(c.dim, epsilon=c.norm_eps, rngs=rngs)
        self.feed_forward = FeedForward(c.dim, c.ffn_hidden, rngs=rngs)

    def __call__(self, x_btd: jax.Array, cos_tf: jax.Array, sin_tf: jax.Array) -> jax.Array:
        # "residual" is where sequence parallelism splits T: the norms run on a T shard.
        # "tp_input" is the input of a tensor-parallel region: whole in T on every device.
        a_btd = shard_activation(self.attention_norm(x_btd), "tp_input")
        h_btd = shard_activation(x_btd + self.attention(a_btd, cos_tf, sin_tf), "residual")
        f_btd = shard_activation(self.ffn_norm(h_btd), "tp_input")
        return shard_activation(h_btd + self.feed_forward(f_btd), "residual")


def _block(block: TransformerBlock, x_btd, cos_tf, sin_tf):
    return block(x_btd, cos_tf, sin_tf)


class Llama(nnx.Module):
    """Llama 3 decoder: ``tokens (B, T) int -> logits (B, T, V)``.

    Example::

      model = Llama(PRESETS["tiny"], rngs=nnx.Rngs(0))
      logits = model(jnp.zeros((2, 16), jnp.int32))  # (2, 16, 512)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok_embeddings = nnx.Embed(config.vocab_size, config.dim, rngs=rngs)
        self.layers = nnx.List(
            [TransformerBlock(config, rngs=rngs) for _ in range(config.n_layers)]
        )
        self.norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
        self.output = _linear(config.dim, config.vocab_size, rngs)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        c = self.config
        if tokens_bt.shape[1] > c.max_seq_len:
            raise ValueError(f"sequence length {tokens_bt.shape[1]} > max_seq_len {c.max_seq_len}")
        cos_tf, sin_tf = rope_tables(c.head_dim, tokens_bt.shape[1], c.rope_theta)
        x_btd = shard_activation(self.tok_embeddings(tokens_bt), "residual")  # (B, T, D)
        block_fn = nnx.remat(_block) if c.remat else _block
        for block in self.layers:
            x_btd = block_fn(block, x_btd, cos_tf, sin_tf)
        logits_btv = self.output(shard_activation(self.norm(x_btd), "tp_input"))  # (B, T, V)
        return shard_activation(logits_btv, "logits")


def cross_entropy(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32.

    Written with a log-sum-exp and a one-hot contraction (no gather along V), so on logits
    sharded over the vocabulary each device reduces its slice and only (B, T) partial
    results cross devices: loss parallelism needs no other code.
    """
    logits = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    onehot_btv = jax.nn.one_hot(labels_bt, logits.shape[-1], dtype=jnp.float32)  # (B, T, V)
    target_bt = jnp.sum(logits * onehot_btv, axis=-1)  # (B, T)
    return jnp.mean(lse_bt - target_bt)
