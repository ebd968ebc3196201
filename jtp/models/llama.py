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

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jtp.models.attention import ATTENTION, layer_attention
from jtp.models.feedforward import ACTIVATIONS, FeedForward
from jtp.models.lora import LoRALinear, parse_targets
from jtp.models.norm import OffsetRMSNorm
from jtp.models.rope import RopeScaling, apply_rope, rope_tables
from jtp.models.stack import ATTENTION_OUT, remat_name, run_blocks
from jtp.parallel.activations import shard_activation
from jtp.parallel.stacked import stack


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
    # What each block keeps for the backward pass: "none", "full" (only its input: the
    # backward recomputes the block), "dots" (also the projections' outputs) or "minimal"
    # (also the attention output); jtp.models.stack says exactly. True/False: "full"/"none".
    remat: str = "none"
    # The blocks' parameters stacked on a leading layer axis and run by one jax.lax.scan
    # (one compiled block whatever n_layers); False: an nnx.List, unrolled (layers.0, ...).
    scan_layers: bool = True
    explicit_head_dim: int | None = None  # E when it is not dim // n_heads (Qwen3: 128 at 1024/16)
    qkv_bias: bool = False  # biases on wq, wk, wv (Qwen2)
    qk_norm: bool = False  # RMSNorm over E of each query and key head, before RoPE (Qwen3)
    tie_embeddings: bool = False  # the output projection is the embedding table, transposed
    # Llama 3.1's long-context RoPE scaling, or a linear one (Gemma 3's global layers)
    rope_scaling: RopeScaling | None = None
    param_dtype: str = "float32"  # parameters (a jnp dtype name)
    # Compute dtype of every layer (MaxText's `dtype` beside `weight_dtype`); None: as the
    # inputs and parameters promote. The Trainer's precision policy sets it per step.
    dtype: str | None = None
    attention: str = "auto"  # auto (cuDNN on GPU, bf16/fp16), xla, cudnn, blockwise (O(T))
    # LoRA (jtp.models.lora): rank r of the adapters; 0 builds plain linears. The adapted
    # linears compute W x + (lora_alpha / r) B A x, as PEFT does; lora_targets names them as
    # PEFT does (q_proj -> "q", ..., down_proj -> "down").
    lora_rank: int = 0
    lora_alpha: float = 16.0  # PEFT's default
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    # Each kv head computed this many times (its copies adjacent: K * kv_replicas heads of
    # keys and values), so that a tensor axis wider than K still gives every device the kv
    # head its query heads use (jtp.plans.replicate_kv sets it to tensor / K). The parameters
    # and the results are those of kv_replicas=1; only the layout of the work changes.
    kv_replicas: int = 1
    # Sliding windows (Mistral, Qwen, Gemma) and what Gemma 2 / 3 add; the defaults are Llama's.
    # W: on a sliding layer a query at position i sees keys i - W < j <= i; None: no window.
    sliding_window: int | None = None
    # Which layers are sliding ones (window, local RoPE base), a pattern repeated over the
    # layers (layer i is sliding_layers[i % len]: Gemma 2 (True, False)); None: every layer.
    sliding_layers: tuple[bool, ...] | None = None
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
    activation: str = "silu"  # the feed-forward's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_offset: bool = False  # RMSNorms scale by (1 + scale), in float32; scales start at 0
    embed_scale: bool = False  # embeddings times sqrt(dim), rounded to the compute dtype
    # Also RMSNorm the attention and feed-forward outputs before their residual adds (Gemma).
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None  # scores times this ** -0.5; None: head_dim's
    attn_softcap: float | None = None  # scores -> tanh(s / cap) * cap before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> tanh(l / cap) * cap (Gemma 2)

    @property
    def head_dim(self) -> int:  # E
        return self.explicit_head_dim or self.dim // self.n_heads

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat))  # True -> "full", ...
        if self.explicit_head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim} not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.attention not in ATTENTION:
            raise ValueError(
                f"LlamaConfig: attention={self.attention!r} must be one of {ATTENTION}"
            )
        object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets))
        if self.lora_rank < 0:
            raise ValueError(f"LlamaConfig: lora_rank {self.lora_rank} must be >= 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.kv_replicas < 1 or self.n_heads % (self.n_kv_heads * self.kv_replicas):
            raise ValueError(
                f"LlamaConfig: kv_replicas {self.kv_replicas} must be >= 1 and n_kv_heads * "
                f"kv_replicas ({self.n_kv_heads * self.kv_replicas}) must divide n_heads "
                f"{self.n_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"LlamaConfig: activation={self.activation!r} must be one of {list(ACTIVATIONS)}"
            )
        if self.sliding_layers is not None:  # a checkpoint's JSON record holds a list
            object.__setattr__(self, "sliding_layers", tuple(bool(x) for x in self.sliding_layers))
            if not self.sliding_layers:
                raise ValueError("LlamaConfig: sliding_layers is empty; give None for every layer")
        positive = {
            "sliding_window": self.sliding_window, "local_rope_theta": self.local_rope_theta,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attn_softcap": self.attn_softcap, "final_softcap": self.final_softcap,
        }  # fmt: skip
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"LlamaConfig: {name}={value!r} must be > 0 (or None: off)")

    @property
    def cached_kv_heads(self) -> int:
        """Heads of keys and values as computed and cached: K * kv_replicas."""
        return self.n_kv_heads * self.kv_replicas

    def layer_sliding(self) -> tuple[bool, ...]:
        """Whether each of the ``n_layers`` layers is a sliding one (``sliding_layers``
        repeated over the layers; every layer when it is None)."""
        pattern = self.sliding_layers or (True,)
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    def num_params(self) -> int:
        d, h, kv, e = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * e * 2 + d * kv * e * 2
        attn += (h + 2 * kv) * e if self.qkv_bias else 0
        attn += 2 * e if self.qk_norm else 0
        block = attn + 3 * d * self.ffn_hidden + (4 if self.sandwich_norms else 2) * d
        tables = 1 if self.tie_embeddings else 2
        return tables * self.vocab_size * d + self.n_layers * block + d


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


def by_kind(sliding: bool | jax.Array, if_sliding: Any, otherwise: Any) -> Any:
    """``if_sliding`` on a sliding layer, else ``otherwise`` (pytrees of one structure):
    chosen while tracing when ``sliding`` is a Python bool, element-wise when it is traced
    (one scanned block for layers of both kinds)."""
    if isinstance(sliding, jax.Array):
        return jax.tree.map(lambda a, b: jnp.where(sliding, a, b), if_sliding, otherwise)
    return if_sliding if sliding else otherwise


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
        h_btd = _gathered(self.norm(x_btd))
        if self.output is None:  # h @ table.T: (B, T, D) x (V, D) -> (B, T, V)
            logits_btv = self.tok_embeddings.attend(h_btd)
        else:
            logits_btv = self.output(h_btd)  # (B, T, V)
        return shard_activation(soft_cap(logits_btv, c.final_softcap), "logits")


def layer_kinds(c: LlamaConfig) -> tuple[tuple[bool, ...], np.ndarray | None]:
    """How the blocks learn whether they are sliding layers: ``((kind,), None)`` when every
    layer is of one kind (a static argument: no branch is compiled), ``((), flags)`` when
    both kinds occur: ``flags`` (L,) bool, each layer's entry passed to its block (a scan
    over stacked layers reads it as data, an unrolled loop as a constant)."""
    flags = c.layer_sliding()
    if len(set(flags)) == 1:
        return (flags[0],), None
    return (), np.asarray(flags)


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
