"""A mixture-of-experts feed-forward in plain single-device Flax NNX (:class:`MoEFeedForward`):
a router chooses ``k`` of ``E`` SwiGLU experts per token, each token's output is the
routing-weighted sum of its experts' outputs, plus Qwen2-MoE's gated shared expert.

Dropless by default: the ``N * k`` (token, expert) pairs are sorted by expert and multiplied
with grouped matmuls (``jax.lax.ragged_dot``), so the matmul work is that of ``k`` dense
feed-forwards whatever ``E`` (:func:`jtp.analysis.dtypes.dots` counts it from the program).
That is the program's work and a TPU's (or a GPU's grouped-matmul kernel's); the CPU
backend lowers ``ragged_dot`` to a dense product masked per group (jax 0.12: each row times
every expert's weights), measured 15.8x the top-k FLOPs at E = 16, k = 2 in the compiled
forward's cost analysis. The capacity path's batched matmuls compile to 1.09x there.
With a capacity factor each expert takes at most ``C`` pairs in fixed-shape buffers (the
pairs past it are dropped and counted), the layout that plain batched matmuls and fixed
all-to-alls want.

Each family's gating as transformers 5.25 computes it (``gating``):

- ``"mixtral"``: the top-k logits, softmaxed over the k chosen (transformers computes it as
  a softmax over E, top-k, renormalised: the same numbers, the common denominator cancels);
  the routing weights stay float32, each expert's output is weighted in float32 and cast
  back to the hidden dtype before the sum over k (``MixtralExperts``).
- ``"softmax_topk"`` (Qwen2-MoE, Qwen3-MoE, OLMoE): softmax over E in float32, the top-k
  probabilities, renormalised to sum 1 where ``norm_topk_prob``; the weights are cast to the
  hidden dtype first and the weighting is done there (``Qwen2MoeTopKRouter``).

The router's logits are float32 whatever the compute dtype (its matmul is taken in float32:
routing decisions are discrete, and bf16 logits flip near-ties; ST-MoE's "selective
precision"). transformers takes the router's matmul in the model's dtype: under a bf16
policy the two may choose differently on near-ties.

What leaves the layer besides its output: :class:`RouterStats`, sums over the tokens, so
that stats of several layers (or a scan's trips) add up and the losses are taken once from
the sums: transformers' load-balancing loss over all layers is that of the *concatenated*
router logits (:func:`load_balancing_loss`), which is not the sum of per-layer losses.
Returned, not sown: ``jax.lax.scan`` over stacked layers (:mod:`jtp.models.stack`) merges a
fresh block each trip and keeps only what the body returns, so a sown ``nnx.Intermediate``
inside it would be lost; returned stats ride the scan's carry, under remat too.

Dimension letters: N tokens (B * T), M = N * k (token, expert) pairs, D model width, E
experts, F an expert's hidden width, C capacity (pairs per expert), K = k (experts per token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.models.feedforward import ACTIVATIONS, FeedForward
from jtp.models.grouped import grouped_dot
from jtp.parallel.expert_exchange import stable_argsort
from jtp.parallel.experts import ExpertMath, per_token, place_experts

GATINGS = ("mixtral", "softmax_topk")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
    """What a MoE layer's routing did, as sums over its tokens (so stats add across layers,
    scan trips and micro-batches: ``a + b``). All float32 but ``dropped``."""

    tokens: jax.Array  # () tokens routed: N per layer
    expert_tokens: jax.Array  # (E,) (token, expert) pairs sent to each expert: the load
    expert_probs: jax.Array  # (E,) sum over tokens of the router's softmax probabilities
    z_loss: jax.Array  # () sum over tokens of logsumexp(logits) ** 2 (ST-MoE's z-loss)
    dropped: jax.Array  # () int32, pairs past an expert's capacity (0 when dropless)

    @classmethod
    def zeros(cls, n_experts: int) -> RouterStats:
        """Stats of no tokens: the start of a sum over layers."""
        scalar, per_expert = jnp.zeros((), jnp.float32), jnp.zeros((n_experts,), jnp.float32)
        return cls(scalar, per_expert, per_expert, scalar, jnp.zeros((), jnp.int32))

    def __add__(self, other: RouterStats) -> RouterStats:
        return jax.tree.map(jnp.add, self, other)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer's, eqs. 4-6) from summed
    stats: ``E * sum_e f_e * P_e``, with ``f_e`` the (token, expert) pairs routed to ``e``
    per token (summed over the k choices) and ``P_e`` the mean router probability of ``e``.

    Over stats summed across layers it equals transformers' loss on the layers' logits
    concatenated (every layer sees the same tokens, so its means are means over the
    concatenation). Its coefficient (``router_aux_loss_coef``) is the caller's.
    """
    n_experts = stats.expert_tokens.shape[-1]
    f_e = stats.expert_tokens / stats.tokens  # (E,)
    p_e = stats.expert_probs / stats.tokens  # (E,)
    return n_experts * jnp.sum(f_e * p_e)


def router_z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE's router z-loss: the mean over tokens (and summed layers) of
    ``logsumexp(logits) ** 2``, which keeps the router's logits small."""
    return stats.z_loss / stats.tokens


def route(
    logits_ne: jax.Array, k: int, gating: str, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Each token's ``k`` experts and their float32 routing weights, from float32 logits
    (N, E). Returns ``(weights (N, K), experts (N, K) int32, probs (N, E), lse (N,))``:
    ``probs`` the softmax over all experts and ``lse`` its log-normaliser (for the losses)."""
    lse_n = jax.nn.logsumexp(logits_ne, axis=-1)  # (N,)
    probs_ne = jnp.exp(logits_ne - lse_n[:, None])  # (N, E)
    if gating == "mixtral":  # softmax over the k chosen logits
        top_nk, experts_nk = jax.lax.top_k(logits_ne, k)  # (N, K) x 2
        weights_nk = jax.nn.softmax(top_nk, axis=-1)  # (N, K)
    elif gating == "softmax_topk":
        weights_nk, experts_nk = jax.lax.top_k(probs_ne, k)  # (N, K) x 2
        if norm_topk_prob:
            weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
    else:
        raise ValueError(f"gating={gating!r} must be one of {GATINGS}")
    return weights_nk, experts_nk.astype(jnp.int32), probs_ne, lse_n


def capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Pairs each expert takes under a capacity ``factor``: ``ceil(factor * N * k / E)``
    (factor 1: an even share), at least 1. ``factor >= E / k`` never drops."""
    return max(1, math.ceil(factor * n_tokens * k / n_experts))


class Experts(nnx.Module):
    """``E`` SwiGLU feed-forwards as stacked weights: ``w1`` (gate) and ``w3`` (up) are
    (E, D, F), ``w2`` (down) is (E, F, D), each expert's slice laid out as a Flax kernel
    ``(in, out)``: jtp's :class:`FeedForward` names, so plans read alike."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        *,
        rngs: nnx.Rngs,
        activation: str = "silu",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        # Flax's Linear default (lecun normal over the input features), one per expert.
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        e, d, f = n_experts, dim, hidden_dim
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (e, f, d), param_dtype))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype))
        self.activation, self.dtype = activation, dtype

    def weights(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``x`` and the three weights in the compute dtype (``dtype``, else promoted, as
        ``nnx.Linear`` does)."""
        w1, w2, w3 = self.w1.get_value(), self.w2.get_value(), self.w3.get_value()
        dtype = self.dtype or jnp.result_type(x, w1)
        return x.astype(dtype), w1.astype(dtype), w2.astype(dtype), w3.astype(dtype)


class Router(nnx.Module):
    """The router: a bias-free linear D -> E whose logits are float32 whatever the compute
    dtype (its matmul is taken in float32; the module docstring says why). Its ``kernel``
    is (D, E), as an ``nnx.Linear``'s (HF's ``gate.weight`` transposed)."""

    def __init__(self, dim: int, n_experts: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (dim, n_experts), param_dtype))

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        kernel_de = self.kernel.get_value().astype(jnp.float32)
        return x_nd.astype(jnp.float32) @ kernel_de  # (N, D) x (D, E) -> (N, E)


class MoEFeedForward(nnx.Module):
    """A mixture-of-experts feed-forward: ``x (B, T, D) -> (y (B, T, D), RouterStats)``.

    Args:
      dim: D, input and output features.
      hidden_dim: F, each expert's hidden width.
      n_experts: E.
      experts_per_token: k, experts each token is sent to.
      rngs: random streams for the initialisers (keyword-only, as in ``nnx.Linear``).
      gating: ``"mixtral"`` or ``"softmax_topk"`` (the module docstring says each).
      norm_topk_prob: ``"softmax_topk"`` only: renormalise the k weights to sum 1.
      shared_hidden_dim: Qwen2-MoE's shared expert, a dense SwiGLU of this width every token
        goes through, scaled by ``sigmoid(shared_expert_gate(x))``; 0: none.
      capacity_factor: None: dropless (grouped matmuls); else each expert takes at most
        :func:`capacity` pairs, in order of token, the rest dropped (their weight lost, the
        token keeps its other experts' output) and counted in ``RouterStats.dropped``.
      activation: the experts' gate, a name in ``ACTIVATIONS``.
      dtype, param_dtype: compute and parameter dtypes (the router computes in float32).
      linear: builds the shared expert's linears, as :class:`FeedForward`'s ``linear``.

    Example::

      moe = MoEFeedForward(64, 128, 8, 2, rngs=nnx.Rngs(0))
      y, stats = moe(jnp.ones((2, 16, 64)))  # (2, 16, 64); stats.expert_tokens: (8,)
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        experts_per_token: int,
        *,
        rngs: nnx.Rngs,
        gating: str = "softmax_topk",
        norm_topk_prob: bool = False,
        shared_hidden_dim: int = 0,
        capacity_factor: float | None = None,
        activation: str = "silu",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        linear: Callable[[str, int, int], nnx.Module] | None = None,
    ):
        if gating not in GATINGS:
            raise ValueError(f"MoEFeedForward: gating={gating!r} must be one of {GATINGS}")
        if not 1 <= experts_per_token <= n_experts:
            raise ValueError(
                f"MoEFeedForward: experts_per_token {experts_per_token} must be in 1 .. "
                f"n_experts ({n_experts})"
            )
        self.n_experts, self.k = n_experts, experts_per_token
        self.gating, self.norm_topk_prob = gating, norm_topk_prob
        self.capacity_factor, self.dtype = capacity_factor, dtype
        self.router = Router(dim, n_experts, rngs=rngs, param_dtype=param_dtype)
        self.experts = Experts(
            dim,
            hidden_dim,
            n_experts,
            rngs=rngs,
            activation=activation,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if shared_hidden_dim:
            self.shared_expert = FeedForward(
                dim,
                shared_hidden_dim,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
                linear=linear,
                activation=activation,
            )
            self.shared_expert_gate = nnx.Linear(
                dim, 1, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.shared_expert = self.shared_expert_gate = None

    def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, RouterStats]:
        b, t, d = x_btd.shape
        n, k, e = b * t, self.k, self.n_experts
        x_nd = x_btd.reshape(n, d)  # (B, T, D) -> (N, D)
        logits_ne = self.router(x_nd)  # (N, E) float32
        # Per token, where the tokens are (a top-k over token-split logits would gather).
        weights_nk, experts_nk, probs_ne, lse_n = per_token(
            functools.partial(route, k=k, gating=self.gating, norm_topk_prob=self.norm_topk_prob),
            logits_ne,
        )
        x_nd, w1, w2, w3 = self.experts.weights(x_nd)
        # The expert work, placed by the plan's "experts" rule (jtp.parallel.experts):
        # here, on every token; under a plan, on each device's own tokens and experts.
        y_nd, dropped = place_experts(self._math(n), x_nd, weights_nk, experts_nk, w1, w2, w3)
        if self.shared_expert is not None:  # Qwen2-MoE: sigmoid(gate(x)) * shared(x)
            gate_n1 = jax.nn.sigmoid(self.shared_expert_gate(x_nd))  # (N, 1)
            # On (B, T, D), as a dense layer's FeedForward: its "ffn_hidden" mark is 3-D.
            shared_nd = self.shared_expert(x_btd).reshape(n, d)  # (B, T, D) -> (N, D)
            y_nd = y_nd + gate_n1 * shared_nd  # (N, D)
        stats = RouterStats(
            tokens=jnp.asarray(n, jnp.float32),
            expert_tokens=jnp.bincount(experts_nk.reshape(n * k), length=e).astype(jnp.float32),
            expert_probs=jnp.sum(probs_ne, axis=0),  # (E,)
            z_loss=jnp.sum(jnp.square(lse_n)),
            dropped=dropped,
        )
        return y_nd.reshape(b, t, d), stats  # (N, D) -> (B, T, D)

    def _math(self, n: int) -> ExpertMath:
        """The layer's expert work as pure functions of the weights (what
        :func:`jtp.parallel.experts.place_experts` runs on each device's slice)."""
        combine = functools.partial(combine_outputs, gating=self.gating)
        grouped = functools.partial(grouped_experts, activation=self.experts.activation)
        local = functools.partial(
            local_experts,
            k=self.k,
            n_experts=self.n_experts,
            capacity_factor=self.capacity_factor,
            activation=self.experts.activation,
            combine=combine,
        )
        return ExpertMath(local, grouped, combine, self.n_experts, self.capacity_factor)


def grouped_experts(
    x_md: jax.Array,
    group_sizes_e: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    *,
    activation: str,
) -> jax.Array:
    """Rows of ``x`` (M, D) sorted by expert, ``group_sizes`` (E,) of them per expert, each
    through its expert: (M, D); rows past ``sum(group_sizes)`` give 0. Grouped matmuls: each
    row meets one expert's weights, so the work is ``M`` rows' whatever ``E``."""
    gate_mf = grouped_dot(x_md, w1, group_sizes_e)  # (M, D) x (E, D, F) -> (M, F)
    up_mf = grouped_dot(x_md, w3, group_sizes_e)  # (M, F)
    h_mf = ACTIVATIONS[activation](gate_mf) * up_mf  # (M, F)
    return grouped_dot(h_mf, w2, group_sizes_e)  # (M, F) x (E, F, D) -> (M, D)


def batched_experts(
    x_ecd: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array, *, activation: str
) -> jax.Array:
    """Each expert on its own fixed-size buffer of rows: (E, C, D) -> (E, C, D)."""
    gate_ecf = jnp.einsum("ecd,edf->ecf", x_ecd, w1)  # (E, C, F)
    up_ecf = jnp.einsum("ecd,edf->ecf", x_ecd, w3)  # (E, C, F)
    h_ecf = ACTIVATIONS[activation](gate_ecf) * up_ecf  # (E, C, F)
    return jnp.einsum("ecf,efd->ecd", h_ecf, w2)  # (E, C, D)


def combine_outputs(y_nkd: jax.Array, weights_nk: jax.Array, *, gating: str) -> jax.Array:
    """Each token's k expert outputs (N, K, D) weighted and summed: (N, D), in the hidden
    dtype, each family's weighting dtype as transformers (module docstring)."""
    w_nk1 = weights_nk[..., None]  # (N, K, 1) float32
    if gating == "mixtral":  # weighted in float32, cast back per expert output
        weighted_nkd = (y_nkd.astype(jnp.float32) * w_nk1).astype(y_nkd.dtype)
    else:  # the weights cast to the hidden dtype first
        weighted_nkd = y_nkd * w_nk1.astype(y_nkd.dtype)
    return jnp.sum(weighted_nkd, axis=1)  # (N, D)


def local_experts(
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    w3: jax.Array,
    first_expert: jax.Array | int,
    *,
    k: int,
    n_experts: int,
    capacity_factor: float | None,
    activation: str,
    combine: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Every token (N, D) through those of its k experts numbered ``first_expert ..
    first_expert + L - 1`` (``L = w1.shape[0]``: this device's experts, all ``n_experts`` on
    one device), weighted and summed: ``(y (N, D), dropped pairs)``; pairs routed to other
    experts contribute 0 (another device adds them).

    The ``N * k`` (token, expert) pairs, pair m = token m // k's choice m % k, are sorted by
    expert (stable: within an expert in token order, which is who a capacity keeps), the
    others after them, multiplied with grouped matmuls (or, with a capacity, batched ones on
    fixed buffers) and unsorted.
    """
    n, d = x_nd.shape
    m, n_local = n * k, w1.shape[0]
    local_m = experts_nk.reshape(m) - first_expert  # (M,) this device's expert number
    mine_m = (local_m >= 0) & (local_m < n_local)  # (M,)
    key_m = jnp.where(mine_m, local_m, n_local)  # (M,) other devices' pairs sort last
    order_m = stable_argsort(key_m)  # (M,) sorted position -> pair
    key_sorted_m = key_m[order_m]  # (M,) ascending
    x_sorted_md = x_nd[order_m // k]  # (M, D) each pair's token, in expert order
    group_sizes_e = jnp.bincount(key_m, length=n_local + 1)[:n_local].astype(jnp.int32)  # (L,)
    if capacity_factor is None:
        y_sorted_md = grouped_experts(x_sorted_md, group_sizes_e, w1, w2, w3, activation=activation)
        dropped = jnp.zeros((), jnp.int32)
    else:
        c = capacity(n, k, n_experts, capacity_factor)
        starts_e = jnp.cumsum(group_sizes_e) - group_sizes_e  # (L,) first sorted index
        mine_sorted_m = key_sorted_m < n_local  # (M,)
        expert_m = jnp.where(mine_sorted_m, key_sorted_m, 0)  # (M,) safe index
        position_m = jnp.arange(m) - starts_e[expert_m]  # (M,) rank within its expert
        position_m = jnp.where(mine_sorted_m, position_m, c)  # others: past every buffer
        buffers_lcd = jnp.zeros((n_local, c, d), x_nd.dtype)
        buffers_lcd = buffers_lcd.at[expert_m, position_m].set(x_sorted_md, mode="drop")
        y_lcd = batched_experts(buffers_lcd, w1, w2, w3, activation=activation)
        y_sorted_md = y_lcd.at[expert_m, position_m].get(mode="fill", fill_value=0)  # (M, D)
        dropped = jnp.sum(mine_sorted_m & (position_m >= c)).astype(jnp.int32)
    # Unsort: pair m's output sits where argsort put it.
    inverse_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(m))  # (M,)
    y_nkd = y_sorted_md[inverse_m].reshape(n, k, d)  # (M, D) -> (N, K, D)
    return combine(y_nkd, weights_nk), dropped  # (N, D)
