"""The decoder of seven families in plain single-device Flax NNX: Llama 3 (the defaults),
Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 (:class:`Decoder`, also known as
``Llama``). One forward for training and generation: the key/value cache
(:mod:`jtp.models.cache`) is an optional argument of :class:`Decoder`'s,
:class:`TransformerBlock`'s and :class:`Attention`'s ``__call__``, as in Flax's Gemma
example (``Transformer.__call__(tokens, positions, cache, mask) -> (logits, cache)``), so a
block feature is written once and generation runs exactly what training runs.

Token embedding, pre-norm blocks of grouped-query attention with RoPE (theta 500000) and a
SwiGLU feed-forward (``w1``, ``w2``, ``w3``: jtp's :class:`FeedForward`), a final RMSNorm and
an output projection. No mesh, no axis names: a plan shards the weights from outside
(:func:`jtp.plans.llama`), and ``shard_activation`` marks ("residual", "tp_input", "heads",
"logits"; "tokens" and "embedding" for fsdp's embedding lookup) let a plan lay out activations
for sequence and loss parallelism; they do nothing without one. The blocks are stacked on a
layer axis and run by one scan (``scan_layers``, the default) or unrolled, each under a remat
policy (:mod:`jtp.models.stack`).

Config fields (:class:`jtp.models.decoder_config.DecoderConfig`) grow the same code into the
Hugging Face relatives :mod:`jtp.models.hf` loads: q/k/v biases (Qwen2), a per-head q/k
RMSNorm and a head dim that is not ``dim / n_heads`` (Qwen3), one table for the embedding and
the output (tied embeddings), and Llama 3.1's RoPE frequency scaling; sliding-window
attention on all layers (Mistral) or on some (Qwen's ``max_window_layers``, Gemma's
interleaving); and Gemma 2 / 3: GeGLU, (1 + w) RMSNorms, the embedding scaled by sqrt(D),
sandwich norms around attention and the feed-forward, a score scale from
``query_pre_attn_scalar``, soft-capped scores and logits, and a second RoPE base for the
sliding layers. Mixtral, Qwen2/3-MoE and OLMoE: a mixture-of-experts feed-forward
(:mod:`jtp.models.moe`) in the sparse layers (``n_experts``, ``moe_layers``), whose router
stats ride along with the residual through the blocks (``Decoder(..., router_stats=True)``
returns them summed). RoPE rotates interleaved feature pairs, as Meta's reference does; the HF
adapter permutes q/k rows on the way in and out (:mod:`jtp.models.hf.names`) and splits
Phi-3's fused projections (:mod:`jtp.models.hf.families.phi3`).

Dimension letters in names and comments: B batch, T query positions (the new tokens), S key
positions (cache slots when cached), D model width, H query heads, K kv heads, R = H / K
queries per kv head, E head dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jtp.errors import InputError
from jtp.models.attention import masked_attention
from jtp.models.cache import KVCache, Slots
from jtp.models.decoder_config import DecoderConfig
from jtp.models.feedforward import FeedForward, per_token
from jtp.models.layer_kinds import by_kind, layer_attention, layer_kinds
from jtp.models.lora import LoRALinear
from jtp.models.moe import MoEFeedForward, RouterStats
from jtp.models.norm import OffsetRMSNorm
from jtp.models.rope import apply_rope, rope_at, rope_tables
from jtp.models.stack import ATTENTION_OUT, run_blocks
from jtp.parallel.activations import shard_activation
from jtp.parallel.context import context_active
from jtp.parallel.stacked import stack

__all__ = [
    "Attention",
    "Decoder",
    "DecoderConfig",
    "TransformerBlock",
    "cross_entropy",
    "scale_embeddings",
    "soft_cap",
]


def _dtypes(c: DecoderConfig) -> dict:
    """``dtype`` (compute) and ``param_dtype`` keyword arguments for Flax layers."""
    return {"dtype": c.dtype and jnp.dtype(c.dtype), "param_dtype": jnp.dtype(c.param_dtype)}


def _linear(
    n_in: int,
    n_out: int,
    c: DecoderConfig,
    rngs: nnx.Rngs,
    *,
    bias: bool = False,
    target: str | None = None,
) -> nnx.Linear:
    """A linear; a :class:`LoRALinear` when ``target`` (PEFT's name: "q", ...) is adapted."""
    # Zero biases (flax's default) so a fresh model computes what a bias-free one would.
    if c.lora_rank and target in c.lora_targets:
        return LoRALinear(
            n_in,
            n_out,
            lora_rank=c.lora_rank,
            lora_alpha=c.lora_alpha,
            use_bias=bias,
            rngs=rngs,
            **_dtypes(c),
        )
    return nnx.Linear(n_in, n_out, use_bias=bias, rngs=rngs, **_dtypes(c))


def _norm(n: int, c: DecoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    # Flax's RMSNorm takes its statistics in float32 whatever the compute dtype; Gemma's
    # scales by (1 + w), all in float32 (jtp.models.norm).
    if c.norm_offset:
        return OffsetRMSNorm(n, epsilon=c.norm_eps, rngs=rngs, **_dtypes(c))
    return nnx.RMSNorm(n, epsilon=c.norm_eps, rngs=rngs, **_dtypes(c))


def scale_embeddings(c: DecoderConfig, x_btd: jax.Array) -> jax.Array:
    """Gemma's embedding scale: ``x * sqrt(D)``, the factor rounded to ``x``'s dtype first, as
    transformers does (in bf16, sqrt(3072) = 55.43 becomes 55.5); others: ``x``."""
    if not c.embed_scale:
        return x_btd
    return x_btd * jnp.asarray(math.sqrt(c.dim), jnp.float32).astype(x_btd.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``tanh(x / cap) * cap`` in ``x``'s dtype (transformers' order); ``x`` when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    """Causal grouped-query attention: K kv heads, each shared by R = H / K query heads;
    over the sequence itself (training, evaluation) or over a key/value cache (generation)."""

    def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.kv_replicas = c.kv_replicas
        self.implementation, self.context_attention = c.attention, c.context_attention
        self.window, self.softcap = c.sliding_window, c.attn_softcap
        # None: jax's default, head_dim ** -0.5 (passing None keeps Llama's program as it was)
        self.scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        self.wq = _linear(c.dim, c.n_heads * c.head_dim, c, rngs, bias=c.qkv_bias, target="q")
        self.wk = _linear(c.dim, c.n_kv_heads * c.head_dim, c, rngs, bias=c.qkv_bias, target="k")
        self.wv = _linear(c.dim, c.n_kv_heads * c.head_dim, c, rngs, bias=c.qkv_bias, target="v")
        self.wo = _linear(c.n_heads * c.head_dim, c.dim, c, rngs, target="o")
        self.qk_norm_all = c.qk_norm and c.qk_norm_scope == "all"
        if self.qk_norm_all:  # OLMoE: (H * E,) and (K * E,) scales, over the whole projection
            self.q_norm = _norm(c.n_heads * c.head_dim, c, rngs)
            self.k_norm = _norm(c.n_kv_heads * c.head_dim, c, rngs)
        elif c.qk_norm:  # one (E,) scale shared by all heads, as Qwen3's q_norm / k_norm
            self.q_norm, self.k_norm = _norm(c.head_dim, c, rngs), _norm(c.head_dim, c, rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x_btd: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        sliding: bool | jax.Array = True,
        cache: KVCache | None = None,
        slots: Slots | None = None,
        positions_bt: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Attention of ``x`` (B, T, D) -> (B, T, D).

        ``cos``/``sin``: RoPE at the tokens' positions (as :func:`apply_rope` takes them);
        ``sliding``: whether this layer is a sliding one (a Python bool, or traced inside a
        scan over layers of both kinds). With ``cache`` (this layer's keys and values,
        (B, S, K, E)) and ``slots`` (where the new tokens go, which slots each may see): the
        new keys and values are written into the cache and the queries attend to the slots
        ``slots`` allows; returns ``(y, the layer's new cache)``. ``positions_bt`` (no
        cache): where the tokens sit when the sequence is not in order (context
        parallelism's pieces); the masks compare positions.
        """
        q_bthe, k_bske, v_bske = self._qkv(x_btd, cos, sin)
        if cache is None:
            # Grouped-query attention: query head h uses kv head h // R (Llama's repeat_kv
            # order). cuDNN's fused kernel on a GPU with bf16 inputs, XLA's O(T^2) path
            # otherwise (jtp.models.attention); both take the softmax in float32.
            out_bthe = layer_attention(
                q_bthe,
                k_bske,
                v_bske,
                sliding=sliding,
                window=self.window,
                implementation=self.implementation,
                scale=self.scale,
                softcap=self.softcap,
                positions_bt=positions_bt,
                context_attention=self.context_attention,
            )
        else:
            cache = cache.write(k_bske, v_bske, slots.index)  # (B, S, K, E) each
            out_bthe = masked_attention(
                q_bthe,
                cache.k.astype(q_bthe.dtype),
                cache.v.astype(q_bthe.dtype),
                slots.mask(sliding),
                scale=self.scale,
                softcap=self.softcap,
            )
        out_bthe = shard_activation(out_bthe, "heads")  # keeps the backward split by head too
        out_bthe = checkpoint_name(out_bthe, ATTENTION_OUT)  # what remat="minimal" keeps
        b, t, h, e = out_bthe.shape
        y_btd = per_token(self.wo, out_bthe.reshape(b, t, h * e))  # (B, T, H * E) -> (B, T, D)
        return y_btd if cache is None else (y_btd, cache)

    def _qkv(
        self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries (B, T, H, E), keys and values (B, T, K * kv_replicas, E) of ``x``, RoPE
        applied, split by head."""
        b, t, _ = x_btd.shape
        h, k, e = self.n_heads, self.n_kv_heads, self.head_dim
        # (B, T, H * E), (B, T, K * E); per_token: one token axis for the matmuls
        q_btf, k_btf = per_token(self.wq, x_btd), per_token(self.wk, x_btd)
        if self.qk_norm_all:  # OLMoE: statistics over all heads' features, before the split
            q_btf, k_btf = self.q_norm(q_btf), self.k_norm(k_btf)
        q_bthe = q_btf.reshape(b, t, h, e)  # (B, T, H, E)
        k_bske = k_btf.reshape(b, t, k, e)  # (B, S, K, E), S = T
        v_bske = per_token(self.wv, x_btd).reshape(b, t, k, e)  # (B, S, K, E)
        if self.kv_replicas > 1:
            # (B, S, K, E) -> (B, S, K * r, E), head j's copies at j*r .. j*r + r - 1, so query
            # head i still meets kv head i // (H / K): with r = tensor / K and the "heads" split
            # below, each device computes, ropes and caches just the kv head its queries use.
            k_bske = jnp.repeat(k_bske, self.kv_replicas, axis=2)
            v_bske = jnp.repeat(v_bske, self.kv_replicas, axis=2)
        if self.q_norm is not None and not self.qk_norm_all:  # each head's E features
            q_bthe, k_bske = self.q_norm(q_bthe), self.k_norm(k_bske)
        # "heads": tensor parallelism splits attention by heads (q, k, v alike).
        q_bthe = shard_activation(apply_rope(q_bthe, cos, sin), "heads")
        k_bske = shard_activation(apply_rope(k_bske, cos, sin), "heads")
        return q_bthe, k_bske, shard_activation(v_bske, "heads")


def _gathered(normed_btd: jax.Array) -> jax.Array:
    """A norm's output entering a tensor-parallel region ("tp_input": whole in T).

    Marked "residual" first, so that under sequence parallelism the all-gather over T
    moves the norm's output in its compute dtype: without it XLA gathers the float32
    product inside the norm (statistics are float32) and converts after, twice the bytes.
    """
    return shard_activation(shard_activation(normed_btd, "residual"), "tp_input")


class TransformerBlock(nnx.Module):
    """A pre-norm block: ``x + attention(norm(x))``, then ``h + feed_forward(norm(h))``, the
    two outputs normed once more before their adds in Gemma's sandwich.

    ``sparse``: the feed-forward is a mixture of experts (:class:`MoEFeedForward`). In a
    model with experts (``n_experts > 0``) every block, dense or sparse, takes and returns
    ``(x, RouterStats)``: the router stats summed over the layers so far ride along with
    ``x`` (a scan's carry; :mod:`jtp.models.moe` says why they are returned, not sown).
    """

    def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs, sparse: bool = False):
        self.attention_norm = _norm(c.dim, c, rngs)
        self.attention = Attention(c, rngs=rngs)
        self.ffn_norm = _norm(c.dim, c, rngs)
        names = {"w1": "gate", "w3": "up", "w2": "down"}  # FeedForward's names -> PEFT's

        def linear(name: str, n_in: int, n_out: int) -> nnx.Linear:
            return _linear(n_in, n_out, c, rngs, target=names[name])

        self.carries_stats, self.sparse = c.n_experts > 0, sparse
        if sparse:
            self.feed_forward = MoEFeedForward(
                c.dim,
                c.moe_ffn_hidden or c.ffn_hidden,
                c.n_experts,
                c.experts_per_token,
                rngs=rngs,
                gating=c.gating,
                norm_topk_prob=c.norm_topk_prob,
                shared_hidden_dim=c.shared_expert_hidden,
                capacity_factor=c.capacity_factor,
                activation=c.activation,
                linear=linear,
                **_dtypes(c),
            )
        else:
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
        self,
        x_btd: jax.Array | tuple[jax.Array, RouterStats],
        cos: jax.Array,
        sin: jax.Array,
        local_rope: tuple[jax.Array, jax.Array] | None = None,
        sliding: bool | jax.Array = True,
        cache: KVCache | None = None,
        slots: Slots | None = None,
        positions_bt: jax.Array | None = None,
    ) -> Any:
        """The block on ``x`` (B, T, D). ``cos``/``sin``: the RoPE tables; ``local_rope``:
        the sliding layers' own (Gemma 3), None: the same; ``sliding``: whether this layer is
        a sliding one (traced inside a scan over both kinds). ``cache``, ``slots``: this
        layer's key/value cache and where the tokens go (:class:`Attention`); with them,
        returns ``(x, the layer's new cache)``. In a model with experts ``x`` is
        ``(x, stats)`` in and out, this layer's router stats added. ``positions_bt`` (no
        cache): the tokens' positions when not in order (:class:`Attention`)."""
        if self.carries_stats:
            x_btd, stats = x_btd
        if local_rope is not None:
            cos, sin = by_kind(sliding, local_rope, (cos, sin))
        # "residual" is where sequence parallelism splits T: the norms run on a T shard.
        # "tp_input" is the input of a tensor-parallel region: whole in T on every device.
        a_btd = _gathered(self.attention_norm(x_btd))
        if cache is None:
            attn_btd = self.attention(a_btd, cos, sin, sliding, positions_bt=positions_bt)
        else:
            attn_btd, cache = self.attention(a_btd, cos, sin, sliding, cache, slots)
        h_btd = shard_activation(x_btd + self._post(self.post_attention_norm, attn_btd), "residual")
        f_btd = self.feed_forward(_gathered(self.ffn_norm(h_btd)))
        if self.sparse:
            f_btd, own = f_btd
            stats = stats + own
        f_btd = self._post(self.post_ffn_norm, f_btd)
        out = shard_activation(h_btd + f_btd, "residual")
        if self.carries_stats:
            out = (out, stats)
        return out if cache is None else (out, cache)

    @staticmethod
    def _post(norm: nnx.RMSNorm | None, y_btd: jax.Array) -> jax.Array:
        """An output as the residual adds it: normed first in a sandwich (Gemma)."""
        # Under sequence parallelism the partial sums of the row-parallel output are
        # reduce-scattered over T before the norm, which runs on a T shard: the "residual"
        # mark after the add lays it out (tests/models/test_llama.py counts the collectives).
        return y_btd if norm is None else norm(y_btd)


class Decoder(nnx.Module):
    """The decoder (Llama 3 by default): ``tokens (B, T) int -> logits (B, T, V)``; with a
    key/value cache, ``-> (logits, new cache)``.

    Example::

      model = Decoder(PRESETS["tiny"], rngs=nnx.Rngs(0))  # or Llama(...): the same class
      logits = model(jnp.zeros((2, 16), jnp.int32))  # (2, 16, 512)
      cache = init_cache(model, batch=2, slots=32)  # jtp.models.cache
      logits, cache = model(prompt_bt, cache=cache)  # prefill: (2, 16) tokens, slots 0 .. 15
      logits, cache = model(next_b1, cache=cache, cache_index=16)  # one more token, slot 16
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok_embeddings = nnx.Embed(config.vocab_size, config.dim, rngs=rngs, **_dtypes(config))

        sparse = config.layer_moe()  # all alike when scanned (DecoderConfig refuses a mix)

        def block(layer_rngs: nnx.Rngs, i: int = 0) -> TransformerBlock:
            return TransformerBlock(config, rngs=layer_rngs, sparse=sparse[i])

        if config.scan_layers:  # layers.attention.wq.kernel: (n_layers, D, H * E)
            self.layers = stack(block, config.n_layers, rngs)
        else:  # layers.0.attention.wq.kernel: (D, H * E), ...
            self.layers = nnx.List([block(rngs, i) for i in range(config.n_layers)])
        self.norm = _norm(config.dim, config, rngs)
        # Tied: no output layer; the logits use the embedding table (one array, one gradient).
        self.output = (
            None if config.tie_embeddings else _linear(config.dim, config.vocab_size, config, rngs)
        )

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        cache: KVCache | None = None,
        positions_bt: jax.Array | None = None,
        cache_index: jax.Array | int = 0,
        valid_bs: jax.Array | None = None,
        router_stats: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache] | tuple[jax.Array, RouterStats]:
        """Logits (B, T, V) of ``tokens_bt``, each attending to itself and every earlier token.

        With ``cache`` (:func:`jtp.models.cache.init_cache`: S slots per sequence) the tokens
        are new ones after those already cached: written into slots ``cache_index ..
        cache_index + T - 1``, each attending to every earlier slot and itself where
        ``valid_bs`` ((B, S) bool) says the slot holds a token of that sequence; RoPE is
        taken at ``positions_bt`` ((B, T) int), each sequence's own positions, so prompts of
        different lengths can be left-padded to one (positions start at 0 after the
        padding, and the padding's slots are not valid). Without padding, the defaults: a
        token's position is its slot, and every slot before ``cache_index + T`` is valid.
        Returns ``(logits, the new cache)``: for every position of the unpadded sequence
        the logits of the cache-free forward (:mod:`jtp.models.cache` says how windows are
        counted). No backward runs through the cached forward: it takes no remat.

        Without a cache, ``positions_bt`` ((B, T) int, every row alike) says where each
        token sits when the sequence is not in order: context parallelism's balanced pieces
        (:mod:`jtp.parallel.context`). RoPE is taken there and attention masks by position,
        so the logits are those of the sequence in order, permuted alike.

        ``router_stats`` (a model with experts, no cache): return ``(logits, stats)``, the
        :class:`RouterStats` of every sparse layer summed (the auxiliary losses are taken
        from them: :func:`jtp.models.moe.load_balancing_loss`); otherwise they are dropped.
        """
        c = self.config
        if router_stats and (not c.n_experts or cache is not None):
            raise ValueError("router_stats needs a model with experts (n_experts > 0), no cache")
        t = tokens_bt.shape[1]
        if cache is None:
            if t > c.max_seq_len:
                raise ValueError(f"sequence length {t} > max_seq_len {c.max_seq_len}")
            if valid_bs is not None:
                raise ValueError("valid_bs describes cache slots: pass a cache")
            if positions_bt is None:
                cos, sin = rope_tables(c.head_dim, t, c.rope_theta, c.rope_scaling)  # (T, E/2)
                local_rope = (
                    None
                    if c.local_rope_theta is None
                    else rope_tables(c.head_dim, t, c.local_rope_theta)
                )
            else:  # (B, T, E/2) x 2: the tokens' own positions
                cos, sin = rope_at(positions_bt, c.head_dim, c.rope_theta, c.rope_scaling)
                local_rope = (
                    None
                    if c.local_rope_theta is None
                    else rope_at(positions_bt, c.head_dim, c.local_rope_theta)
                )
        else:
            if context_active():
                raise InputError(
                    "a key/value cache is not split over 'context': the cached forward "
                    "(generation) runs under the activation rules of a mesh without a context "
                    "axis (context parallelism splits training and evaluation sequences)"
                )
            b, s = tokens_bt.shape[0], cache.k.shape[2]
            if positions_bt is None:  # no padding: a token's position is its slot
                positions_bt = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
            if valid_bs is None:  # every slot up to the new tokens' last
                valid_bs = jnp.broadcast_to(jnp.arange(s) < cache_index + t, (b, s))
            slots = Slots.at(cache_index, t, valid_bs, c.sliding_window)
            # Each sequence's own positions: (B, T, E/2) x 2
            cos, sin = rope_at(positions_bt, c.head_dim, c.rope_theta, c.rope_scaling)
            local_rope = (
                None
                if c.local_rope_theta is None
                else rope_at(positions_bt, c.head_dim, c.local_rope_theta)
            )
        # "tokens", "embedding": under fsdp the table is split (V on "tensor", D on "data"), so
        # the lookup reads every sequence and yields D split on "data". Marked, the move to
        # the residual's layout is one all-to-all each way; unmarked, XLA's partitioner of
        # the backward scatter-add may all-gather the whole (B, T, D) cotangent instead.
        x_btd = self.tok_embeddings(shard_activation(tokens_bt, "tokens"))
        x_btd = scale_embeddings(c, x_btd)
        x_btd = shard_activation(shard_activation(x_btd, "embedding"), "residual")  # (B, T, D)
        kinds, per_layer = layer_kinds(c)
        # With experts the blocks' carry is (x, router stats summed over the layers so far).
        carry = (x_btd, RouterStats.zeros(c.n_experts)) if c.n_experts else x_btd
        args = (self.layers, carry, cos, sin, local_rope, *kinds)
        if cache is None:
            pieces = {} if positions_bt is None else {"positions_bt": positions_bt}
            carry = run_blocks(*args, remat=c.remat, xs=per_layer, **pieces)  # (B, T, D)
        else:  # each layer reads and replaces its slice of the cache
            carry, cache = run_blocks(*args, xs=per_layer, cache=cache, slots=slots)
        x_btd, stats = carry if c.n_experts else (carry, None)
        logits_btv = shard_activation(self.head(_gathered(self.norm(x_btd))), "logits")
        if router_stats:
            return logits_btv, stats
        return logits_btv if cache is None else (logits_btv, cache)

    def head(self, h_btd: jax.Array) -> jax.Array:
        """Logits (B, T, V) of the final norm's output: the output projection, or tied,
        ``h @ table.T``; soft-capped where configured."""
        # One token axis N = B * T (jtp.models.feedforward.per_token says why): contracting
        # (B, T) the weight gradient would first copy the (B, T, V) logits' gradient
        # transposed. (N, D) x (V, D) -> (N, V) tied, else (N, D) x (D, V).
        project = self.tok_embeddings.attend if self.output is None else self.output
        logits_btv = per_token(project, h_btd)  # (B, T, V)
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
