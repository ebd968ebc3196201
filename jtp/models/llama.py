"""A Llama-3-style decoder in plain single-device Flax NNX.

Token embedding, pre-norm blocks of grouped-query attention with RoPE (theta 500000) and a
SwiGLU feed-forward (``w1``, ``w2``, ``w3``: jtp's :class:`FeedForward`), a final RMSNorm and
an output projection. No mesh, no axis names: a plan shards the weights from outside
(:func:`jtp.plans.llama`), and ``shard_activation`` marks ("residual", "tp_input", "heads",
"logits"; "tokens" and "embedding" for fsdp's embedding lookup) let a plan lay out activations
for sequence and loss parallelism; they do nothing without one. The blocks are stacked on a
layer axis and run by one scan (``scan_layers``, the default) or unrolled, each under a remat
policy (:mod:`jtp.models.stack`).

Config fields grow the same code into the Hugging Face relatives :mod:`jtp.models.hf` loads:
q/k/v biases (Qwen2), a per-head q/k RMSNorm and a head dim that is not ``dim / n_heads``
(Qwen3), one table for the embedding and the output (tied embeddings), and Llama 3.1's RoPE
frequency scaling; sliding-window attention on all layers (Mistral) or on some (Qwen's
``max_window_layers``, Gemma's interleaving); and Gemma 2 / 3: GeGLU, (1 + w) RMSNorms, the
embedding scaled by sqrt(D), sandwich norms around attention and the feed-forward, a score
scale from ``query_pre_attn_scalar``, soft-capped scores and logits, and a second RoPE base
for the sliding layers. RoPE rotates interleaved feature pairs, as Meta's reference does; the
HF adapter permutes q/k rows on the way in and out (:mod:`jtp.models.hf.names`).

Dimension letters in names and comments: B batch, T query positions, S key positions,
D model width, H query heads, K kv heads, R = H / K queries per kv head, E head dim, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jtp.models.feedforward import FeedForward
from jtp.models.layer_kinds import by_kind, layer_attention, layer_kinds
from jtp.models.llama_config import PRESETS, LlamaConfig
from jtp.models.lora import LoRALinear
from jtp.models.norm import OffsetRMSNorm
from jtp.models.rope import apply_rope, rope_tables
from jtp.models.stack import ATTENTION_OUT, run_blocks
from jtp.parallel.activations import shard_activation
from jtp.parallel.stacked import stack

__all__ = [
    "PRESETS", "Attention", "Llama", "LlamaConfig", "TransformerBlock", "cross_entropy",
    "scale_embeddings", "soft_cap",
]  # fmt: skip


def _dtypes(c: LlamaConfig) -> dict:
    """``dtype`` (compute) and ``param_dtype`` keyword arguments for Flax layers."""
    return {"dtype": c.dtype and jnp.dtype(c.dtype), "param_dtype": jnp.dtype(c.param_dtype)}


def _linear(
    n_in: int, n_out: int, c: LlamaConfig, rngs: nnx.Rngs, *, bias: bool = False,
    target: str | None = None,
) -> nnx.Linear:  # fmt: skip
    """A linear; a :class:`LoRALinear` when ``target`` (PEFT's name: "q", ...) is adapted."""
    # Zero biases (flax's default) so a fresh model computes what a bias-free one would.
    if c.lora_rank and target in c.lora_targets:
        return LoRALinear(
            n_in, n_out, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, use_bias=bias,
            rngs=rngs, **_dtypes(c),
        )  # fmt: skip
    return nnx.Linear(n_in, n_out, use_bias=bias, rngs=rngs, **_dtypes(c))


def _norm(n: int, c: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    # Flax's RMSNorm takes its statistics in float32 whatever the compute dtype; Gemma's
    # scales by (1 + w), all in float32 (jtp.models.norm).
    if c.norm_offset:
        return OffsetRMSNorm(n, epsilon=c.norm_eps, rngs=rngs, **_dtypes(c))
    return nnx.RMSNorm(n, epsilon=c.norm_eps, rngs=rngs, **_dtypes(c))


def scale_embeddings(c: LlamaConfig, x_btd: jax.Array) -> jax.Array:
    """Gemma's embedding scale: ``x * sqrt(D)``, the factor rounded to ``x``'s dtype first, as
    transformers does (in bf16, sqrt(3072) = 55.43 becomes 55.5); others: ``x``."""
    if not c.embed_scale:
        return x_btd
    return x_btd * jnp.asarray(math.sqrt(c.dim), jnp.float32).astype(x_btd.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``tanh(x / cap) * cap`` in ``x``'s dtype (transformers' order); ``x`` when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    """Causal grouped-query attention: K kv heads, each shared by R = H / K query heads."""

    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.kv_replicas = c.kv_replicas
        self.implementation = c.attention
        self.window, self.softcap = c.sliding_window, c.attn_softcap
        # None: jax's default, head_dim ** -0.5 (passing None keeps Llama's program as it was)
        self.scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        self.wq = _linear(c.dim, c.n_heads * c.head_dim, c, rngs, bias=c.qkv_bias, target="q")
        self.wk = _linear(c.dim, c.n_kv_heads * c.head_dim, c, rngs, bias=c.qkv_bias, target="k")
        self.wv = _linear(c.dim, c.n_kv_heads * c.head_dim, c, rngs, bias=c.qkv_bias, target="v")
        self.wo = _linear(c.n_heads * c.head_dim, c.dim, c, rngs, target="o")
        if c.qk_norm:  # one (E,) scale shared by all heads, as Qwen3's q_norm / k_norm
            self.q_norm, self.k_norm = _norm(c.head_dim, c, rngs), _norm(c.head_dim, c, rngs)
        else:
            self.q_norm = self.k_norm = None

    def qkv(
        self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries (B, T, H, E), keys and values (B, T, K * kv_replicas, E) of ``x``, RoPE
        applied (``cos``/``sin`` as :func:`apply_rope` takes them), split by head."""
        b, t, _ = x_btd.shape
        h, k, e = self.n_heads, self.n_kv_heads, self.head_dim
        q_bthe = self.wq(x_btd).reshape(b, t, h, e)  # (B, T, H, E)
        k_bske = self.wk(x_btd).reshape(b, t, k, e)  # (B, S, K, E), S = T
        v_bske = self.wv(x_btd).reshape(b, t, k, e)  # (B, S, K, E)
        if self.kv_replicas > 1:
            # (B, S, K, E) -> (B, S, K * r, E), head j's copies at j*r .. j*r + r - 1, so query
            # head i still meets kv head i // (H / K): with r = tensor / K and the "heads" split
            # below, each device computes, ropes and caches just the kv head its queries use.
            k_bske = jnp.repeat(k_bske, self.kv_replicas, axis=2)
            v_bske = jnp.repeat(v_bske, self.kv_replicas, axis=2)
        if self.q_norm is not None:  # normalises each head's E features
            q_bthe, k_bske = self.q_norm(q_bthe), self.k_norm(k_bske)
        # "heads": tensor parallelism splits attention by heads (q, k, v alike).
        q_bthe = shard_activation(apply_rope(q_bthe, cos, sin), "heads")
        k_bske = shard_activation(apply_rope(k_bske, cos, sin), "heads")
        return q_bthe, k_bske, shard_activation(v_bske, "heads")

    def out(self, out_bthe: jax.Array) -> jax.Array:
        """The output projection of attention's (B, T, H, E) result -> (B, T, D)."""
        b, t, h, e = out_bthe.shape
        return self.wo(out_bthe.reshape(b, t, h * e))

    def __call__(
        self, x_btd: jax.Array, cos_tf: jax.Array, sin_tf: jax.Array,
        sliding: bool | jax.Array = True,
    ) -> jax.Array:  # fmt: skip
        """Attention of ``x`` (B, T, D) -> (B, T, D); ``sliding``: whether this layer is a
        sliding one (a Python bool, or traced inside a scan over layers of both kinds)."""
        q_bthe, k_bske, v_bske = self.qkv(x_btd, cos_tf, sin_tf)
        # Grouped-query attention: query head h uses kv head h // R (Llama's repeat_kv order).
        # cuDNN's fused kernel on a GPU with bf16 inputs, XLA's O(T^2) path otherwise
        # (jtp.models.attention); both take the softmax in float32.
        out_bthe = layer_attention(
            q_bthe, k_bske, v_bske, sliding=sliding, window=self.window,
            implementation=self.implementation, scale=self.scale, softcap=self.softcap,
        )  # fmt: skip
        out_bthe = shard_activation(out_bthe, "heads")  # keeps the backward split by head too
        out_bthe = checkpoint_name(out_bthe, ATTENTION_OUT)  # what remat="minimal" keeps
        return self.out(out_bthe)  # (B, T, D)


def _gathered(normed_btd: jax.Array) -> jax.Array:
    """A norm's output entering a tensor-parallel region ("tp_input": whole in T).

    Marked "residual" first, so that under sequence parallelism the all-gather over T
    moves the norm's output in its compute dtype: without it XLA gathers the float32
    product inside the norm (statistics are float32) and converts after, twice the bytes.
    """
    return shard_activation(shard_activation(normed_btd, "residual"), "tp_input")


class TransformerBlock(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.attention_norm = _norm(c.dim, c, rngs)
        self.attention = Attention(c, rngs=rngs)
        self.ffn_norm = _norm(c.dim, c, rngs)
        names = {"w1": "gate", "w3": "up", "w2": "down"}  # FeedForward's names -> PEFT's

        def linear(name: str, n_in: int, n_out: int) -> nnx.Linear:
            return _linear(n_in, n_out, c, rngs, target=names[name])

        self.feed_forward = FeedForward(
            c.dim, c.ffn_hidden, rngs=rngs, linear=linear, activation=c.activation
        )
        # Gemma's sandwich: the attention and feed-forward outputs normed before each add
        # (HF's post_attention_layernorm / post_feedforward_layernorm; its pre-FFN norm,
        # pre_feedforward_layernorm, is ffn_norm, which Llama's files call post_attention).
        if c.sandwich_norms:
            self.post_attention_norm = _norm(c.dim, c, rngs)
            self.post_ffn_norm = _norm(c.dim, c, rngs)
        else:
            self.post_attention_norm = self.post_ffn_norm = None

    def __call__(
        self, x_btd: jax.Array, cos_tf: jax.Array, sin_tf: jax.Array,
        local_rope: tuple[jax.Array, jax.Array] | None = None, sliding: bool | jax.Array = True,
    ) -> jax.Array:  # fmt: skip
        """The block on ``x`` (B, T, D). ``cos_tf``/``sin_tf``: the RoPE tables;
        ``local_rope``: the sliding layers' own (Gemma 3), None: the same; ``sliding``:
        whether this layer is a sliding one (traced inside a scan over both kinds)."""
        if local_rope is not None:
            cos_tf, sin_tf = by_kind(sliding, local_rope, (cos_tf, sin_tf))
        # "residual" is where sequence parallelism splits T: the norms run on a T shard.
        # "tp_input" is the input of a tensor-parallel region: whole in T on every device.
        a_btd = _gathered(self.attention_norm(x_btd))
        attn_btd = self.after_attention(self.attention(a_btd, cos_tf, sin_tf, sliding))
        h_btd = shard_activation(x_btd + attn_btd, "residual")
        f_btd = _gathered(self.ffn_norm(h_btd))
        return shard_activation(h_btd + self.after_ffn(self.feed_forward(f_btd)), "residual")

    def after_attention(self, y_btd: jax.Array) -> jax.Array:
        """Attention's output as the residual adds it: normed first in a sandwich (Gemma)."""
        return self._post(self.post_attention_norm, y_btd)

    def after_ffn(self, y_btd: jax.Array) -> jax.Array:
        """The feed-forward's output as the residual adds it: normed first in a sandwich."""
        return self._post(self.post_ffn_norm, y_btd)

    @staticmethod
    def _post(norm: nnx.RMSNorm | None, y_btd: jax.Array) -> jax.Array:
        # Under sequence parallelism the partial sums of the row-parallel output are
        # reduce-scattered over T before the norm, which runs on a T shard: the "residual"
        # mark after the add lays it out (tests/models/test_llama.py counts the collectives).
        return y_btd if norm is None else norm(y_btd)


class Llama(nnx.Module):
    """Llama 3 decoder: ``tokens (B, T) int -> logits (B, T, V)``.

    Example::

      model = Llama(PRESETS["tiny"], rngs=nnx.Rngs(0))
      logits = model(jnp.zeros((2, 16), jnp.int32))  # (2, 16, 512)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok_embeddings = nnx.Embed(config.vocab_size, config.dim, rngs=rngs, **_dtypes(config))

        def block(layer_rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(config, rngs=layer_rngs)

        if config.scan_layers:  # layers.attention.wq.kernel: (n_layers, D, H * E)
            self.layers = stack(block, config.n_layers, rngs)
        else:  # layers.0.attention.wq.kernel: (D, H * E), ...
            self.layers = nnx.List([block(rngs) for _ in range(config.n_layers)])
        self.norm = _norm(config.dim, config, rngs)
        # Tied: no output layer; the logits use the embedding table (one array, one gradient).
        self.output = (
            None if config.tie_embeddings else _linear(config.dim, config.vocab_size, config, rngs)
        )

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        c = self.config
        t = tokens_bt.shape[1]
        if t > c.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {c.max_seq_len}")
        cos_tf, sin_tf = rope_tables(c.head_dim, t, c.rope_theta, c.rope_scaling)
        local_rope = None if c.local_rope_theta is None else rope_tables(
            c.head_dim, t, c.local_rope_theta
        )  # fmt: skip
        # "tokens", "embedding": under fsdp the table is split (V on "tensor", D on "data"), so
        # the lookup reads every sequence and yields D split on "data". Marked, the move to
        # the residual's layout is one all-to-all each way; unmarked, XLA's partitioner of
        # the backward scatter-add may all-gather the whole (B, T, D) cotangent instead.
        x_btd = self.tok_embeddings(shard_activation(tokens_bt, "tokens"))
        x_btd = scale_embeddings(c, x_btd)
        x_btd = shard_activation(shard_activation(x_btd, "embedding"), "residual")  # (B, T, D)
        kinds, per_layer = layer_kinds(c)
        x_btd = run_blocks(
            self.layers, x_btd, cos_tf, sin_tf, local_rope, *kinds, remat=c.remat, xs=per_layer
        )  # (B, T, D)
        return shard_activation(self.head(_gathered(self.norm(x_btd))), "logits")

    def head(self, h_btd: jax.Array) -> jax.Array:
        """Logits (B, T, V) of the final norm's output (also :mod:`jtp.models.decode`'s):
        the output projection, or tied, ``h @ table.T``; soft-capped where configured."""
        if self.output is None:  # (B, T, D) x (V, D) -> (B, T, V)
            logits_btv = self.tok_embeddings.attend(h_btd)
        else:
            logits_btv = self.output(h_btd)  # (B, T, V)
        return soft_cap(logits_btv, self.config.final_softcap)


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
