"""The decoder's config (:class:`DecoderConfig`, also known as ``LlamaConfig``): what the
model computes and how it is run, as one frozen dataclass with a comment per field. Its
defaults are Llama 3's; the fields after ``kv_replicas`` grow it into Mistral, Qwen2/3,
Phi-3 and Gemma 2/3, and the MoE fields (``n_experts`` ...) into Mixtral, Qwen2/3-MoE and
OLMoE. :mod:`jtp.models.decoder` builds the model from it; the plans, the HF
adapter (:mod:`jtp.models.hf.config`) and the CLI read it; :mod:`jtp.models.llama` holds
the presets and the Llama names.
"""

from __future__ import annotations

import dataclasses

from jtp.errors import InputError
from jtp.models.attention import ATTENTION
from jtp.models.feedforward import ACTIVATIONS
from jtp.models.lora import parse_targets
from jtp.models.moe import GATINGS
from jtp.models.rope import RopeScaling
from jtp.models.stack import remat_name
from jtp.parallel.context import STRATEGIES as CONTEXT_STRATEGIES

QK_NORM_SCOPES = ("head", "all")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What the decoder computes and how it runs; the defaults are Llama 3's (the "tiny"
    preset's shapes). Also known as ``LlamaConfig`` (:mod:`jtp.models.llama`)."""

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
    # What qk_norm normalises: "head" (each head's E features: Qwen3, Gemma 3) or "all" (the
    # whole projection at once, H * E features of q and K * E of k, one scale per feature:
    # OLMoE's q_norm / k_norm, taken before the split into heads).
    qk_norm_scope: str = "head"
    tie_embeddings: bool = False  # the output projection is the embedding table, transposed
    # Llama 3.1's long-context RoPE scaling, or a linear one (Gemma 3's global layers)
    rope_scaling: RopeScaling | None = None
    param_dtype: str = "float32"  # parameters (a jnp dtype name)
    # Compute dtype of every layer (MaxText's `dtype` beside `weight_dtype`); None: as the
    # inputs and parameters promote. The Trainer's precision policy sets it per step.
    dtype: str | None = None
    attention: str = "auto"  # auto (cuDNN on GPU, bf16/fp16), xla, cudnn, blockwise (O(T))
    # How attention crosses a context axis' pieces (jtp.parallel.context): "all-gather" of
    # the keys and values, or "ring" (jtp.models.ring). Only read on a mesh with that axis.
    context_attention: str = "all-gather"
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
    # Mixture of experts (jtp.models.moe): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.
    n_experts: int = 0  # E experts in each sparse layer's feed-forward; 0: every layer dense
    experts_per_token: int = 2  # k experts each token is sent to (num_experts_per_tok)
    moe_ffn_hidden: int = 0  # F of each expert (moe_intermediate_size); 0: ffn_hidden (Mixtral)
    # "softmax_topk" only: the k routing weights renormalised to sum 1 (Qwen3-30B-A3B's
    # checkpoint sets it; transformers' default and OLMoE's are False). Mixtral's always are.
    norm_topk_prob: bool = False
    # How the router's logits become weights: "mixtral" (softmax over the top-k logits,
    # weighted in float32) or "softmax_topk" (Qwen2/3-MoE, OLMoE: softmax over E, top-k,
    # weights in the hidden dtype); jtp.models.moe says exactly.
    gating: str = "softmax_topk"
    shared_expert_hidden: int = 0  # Qwen2-MoE's sigmoid-gated shared expert width; 0: none
    # Which layers are sparse, a pattern repeated over the layers as sliding_layers (layer i
    # is sparse iff moe_layers[i % len]); None: all, when n_experts > 0. Expresses Qwen's
    # decoder_sparse_step and mlp_only_layers. Mixed layers need scan_layers=False.
    moe_layers: tuple[bool, ...] | None = None
    # Load-balancing loss coefficient (transformers' default for Mixtral and Qwen-MoE; it
    # adds the term only with output_router_logits); applied by the training step.
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0  # ST-MoE's router z-loss coefficient; 0: off
    # None: dropless (grouped matmuls); else each expert takes ceil(factor * N * k / E)
    # (token, expert) pairs of a batch's N tokens and drops the rest (counted).
    capacity_factor: float | None = None

    @property
    def head_dim(self) -> int:  # E
        return self.explicit_head_dim or self.dim // self.n_heads

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat))  # True -> "full", ...
        if self.explicit_head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"DecoderConfig: dim {self.dim} not divisible by n_heads {self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.attention not in ATTENTION:
            raise ValueError(
                f"DecoderConfig: attention={self.attention!r} must be one of {ATTENTION}"
            )
        if self.context_attention not in CONTEXT_STRATEGIES:
            raise ValueError(
                f"DecoderConfig: context_attention={self.context_attention!r} must be one of "
                f"{CONTEXT_STRATEGIES}"
            )
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(
                f"DecoderConfig: qk_norm_scope={self.qk_norm_scope!r} must be one of "
                f"{QK_NORM_SCOPES}"
            )
        object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets))
        if self.lora_rank < 0:
            raise ValueError(f"DecoderConfig: lora_rank {self.lora_rank} must be >= 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"DecoderConfig: n_heads {self.n_heads} not divisible by n_kv_heads "
                f"{self.n_kv_heads}"
            )
        if self.kv_replicas < 1 or self.n_heads % (self.n_kv_heads * self.kv_replicas):
            raise ValueError(
                f"DecoderConfig: kv_replicas {self.kv_replicas} must be >= 1 and n_kv_heads * "
                f"kv_replicas ({self.n_kv_heads * self.kv_replicas}) must divide n_heads "
                f"{self.n_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"DecoderConfig: activation={self.activation!r} must be one of {list(ACTIVATIONS)}"
            )
        if self.sliding_layers is not None:  # a checkpoint's JSON record holds a list
            object.__setattr__(self, "sliding_layers", tuple(bool(x) for x in self.sliding_layers))
            if not self.sliding_layers:
                raise ValueError(
                    "DecoderConfig: sliding_layers is empty; give None for every layer"
                )
        self._check_moe()
        positive = {
            "sliding_window": self.sliding_window,
            "local_rope_theta": self.local_rope_theta,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attn_softcap": self.attn_softcap,
            "final_softcap": self.final_softcap,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"DecoderConfig: {name}={value!r} must be > 0 (or None: off)")

    def _check_moe(self) -> None:
        """The mixture-of-experts fields make sense together (``__post_init__``)."""
        if self.moe_layers is not None:  # a checkpoint's JSON record holds a list
            object.__setattr__(self, "moe_layers", tuple(bool(x) for x in self.moe_layers))
        if self.n_experts < 0:
            raise ValueError(f"DecoderConfig: n_experts {self.n_experts} must be >= 0 (0: dense)")
        if not self.n_experts:
            moe_only = {"moe_layers": None, "shared_expert_hidden": 0, "capacity_factor": None}
            for name, off in moe_only.items():
                if getattr(self, name) != off:
                    raise ValueError(f"DecoderConfig: {name} needs n_experts > 0 (a MoE model)")
            return
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(
                f"DecoderConfig: experts_per_token {self.experts_per_token} must be in 1 .. "
                f"n_experts ({self.n_experts})"
            )
        if self.gating not in GATINGS:
            raise ValueError(f"DecoderConfig: gating={self.gating!r} must be one of {GATINGS}")
        if self.moe_layers == ():
            raise ValueError("DecoderConfig: moe_layers is empty; give None for every layer")
        for name in ("moe_ffn_hidden", "shared_expert_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"DecoderConfig: {name} {getattr(self, name)} must be >= 0")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DecoderConfig: {name} {getattr(self, name)} must be >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"DecoderConfig: capacity_factor {self.capacity_factor} must be > 0 "
                "(or None: dropless)"
            )
        if self.scan_layers and len(set(self.layer_moe())) > 1:
            raise ValueError(
                "DecoderConfig: moe_layers mixes dense and sparse layers, and scanned layers "
                "share one structure (one parameter set per layer): build them unrolled "
                "(scan_layers=False, --no-scan-layers)"
            )
        adapted = {"gate", "up", "down"} & set(self.lora_targets)
        if self.lora_rank and adapted:
            raise InputError(
                f"DecoderConfig: LoRA on the feed-forward ({','.join(sorted(adapted))}) of a MoE "
                "model is not supported: its experts are stacked (E, D, F) weights, and PEFT's "
                "layout for adapters on fused 3-D experts is each family's own, which jtp does "
                "not write; adapt the attention projections only (lora_targets / "
                "--lora-targets q,k,v,o)"
            )

    def layer_moe(self) -> tuple[bool, ...]:
        """Whether each of the ``n_layers`` layers has a mixture-of-experts feed-forward
        (``moe_layers`` repeated over the layers; every layer when it is None; none when
        ``n_experts`` is 0)."""
        if not self.n_experts:
            return (False,) * self.n_layers
        pattern = self.moe_layers or (True,)
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

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
        """Every parameter of the model (with experts: all experts of every sparse layer)."""
        return self._params(self.n_experts)

    def num_active_params(self) -> int:
        """The parameters one token's forward uses: with experts, ``experts_per_token`` of
        each sparse layer's ``n_experts`` (the router and any shared expert whole); a dense
        model's are all of them. Mixtral-8x7B: 12.9B of 46.7B; Qwen3-30B-A3B: 3.3B of 30.5B
        (the embedding table counted, as the model cards do)."""
        return self._params(self.experts_per_token if self.n_experts else 0)

    def num_expert_params(self) -> int:
        """The stacked experts' parameters (``w1``, ``w2``, ``w3`` of every sparse layer);
        0 for a dense model."""
        f = self.moe_ffn_hidden or self.ffn_hidden
        return sum(self.layer_moe()) * 3 * self.n_experts * self.dim * f

    def _params(self, experts: int) -> int:
        """Parameters with ``experts`` experts counted per sparse layer."""
        d, h, kv, e = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * e * 2 + d * kv * e * 2
        attn += (h + 2 * kv) * e if self.qkv_bias else 0
        if self.qk_norm:
            attn += 2 * e if self.qk_norm_scope == "head" else (h + kv) * e
        block = attn + (4 if self.sandwich_norms else 2) * d
        dense = 3 * d * self.ffn_hidden
        f, s = self.moe_ffn_hidden or self.ffn_hidden, self.shared_expert_hidden
        sparse = d * self.n_experts + 3 * experts * d * f + (3 * d * s + d if s else 0)
        ffns = sum(sparse if moe else dense for moe in self.layer_moe())
        tables = 1 if self.tie_embeddings else 2
        return tables * self.vocab_size * d + self.n_layers * block + ffns + d
