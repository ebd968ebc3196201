"""The seed's model: the SwiGLU feed-forward block of Lightning's tensor-parallel docs.

Single-device code: no mesh, no axis names (the one ``shard_activation`` mark is a no-op
unless a plan names it). ``jtp`` shards it from outside with a plan such as
``{"w1": ColwiseParallel(), "w2": RowwiseParallel(), "w3": ColwiseParallel()}``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jtp.parallel.activations import shard_activation
from jtp.parallel.context import context_active

# The gate's nonlinearity by name: SwiGLU's silu (Llama) or GeGLU's gelu with the tanh
# approximation (Gemma; transformers' "gelu_pytorch_tanh", the same formula).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nnx.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def per_token(layer: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``layer(x)`` for a linear ``layer`` applied to each token: the leading axes of ``x``
    merged into one (N = B * T, a reshape) around the matmul, ``(..., n_in) -> (..., n_out)``.

    Why: the backward's weight gradient then contracts one token axis, which XLA's CPU dot
    reads where it lies; contracting (B, T) XLA first copies one operand transposed, each
    layer and step (docs/performance.md, "Where a CPU training step's time goes"). The same
    numbers either way: only the shapes around the matmul change (reshapes of contiguous
    axes, free on any backend). Not on a mesh with a context axis: there T is split as well,
    and one axis split over both "data" and "context" makes the partitioner reshard around
    every matmul (more all-gathers and permutes than the (B, T) form).
    """
    if context_active():
        return layer(x)
    lead = x.shape[:-1]
    y_nf = layer(x.reshape(-1, x.shape[-1]))  # (N, n_in) -> (N, n_out)
    return y_nf.reshape(*lead, y_nf.shape[-1])


class FeedForward(nnx.Module):
    """``w2(silu(w1(x)) * w3(x))`` with bias-free linears (Llama's MLP; Gemma's with gelu).

    Args:
      dim: input and output features.
      hidden_dim: features of the gated hidden layer.
      rngs: random streams for the kernel initialisers (keyword-only, as in ``nnx.Linear``).
      dtype: computation dtype (``None``: promote from inputs and params).
      param_dtype: parameter dtype.
      linear: builds each linear instead, as ``linear(name, n_in, n_out)`` with name
        ``"w1"``, ``"w2"`` or ``"w3"`` (how jtp's Llama puts LoRA adapters on some of them);
        ``dtype`` and ``param_dtype`` are then its business.
      activation: the gate's nonlinearity, a name in :data:`ACTIVATIONS` ("silu": SwiGLU,
        "gelu_tanh": GeGLU).

    Example::

      model = FeedForward(64, 256, rngs=nnx.Rngs(0))
      y = model(jnp.ones((8, 64)))  # (8, 64)
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        linear: Callable[[str, int, int], nnx.Module] | None = None,
        activation: str = "silu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"FeedForward: activation={activation!r} must be one of {list(ACTIVATIONS)}"
            )

        def plain(name: str, n_in: int, n_out: int) -> nnx.Linear:
            return nnx.Linear(
                n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

        make = linear or plain
        self.w1 = make("w1", dim, hidden_dim)
        self.w2 = make("w2", hidden_dim, dim)
        self.w3 = make("w3", dim, hidden_dim)
        self.activation = activation

    def __call__(self, x_bd: jnp.ndarray) -> jnp.ndarray:
        gate_bh, up_bh = per_token(self.w1, x_bd), per_token(self.w3, x_bd)  # (..., hidden_dim)
        h_bh = ACTIVATIONS[self.activation](gate_bh) * up_bh
        # A no-op unless a plan gives "ffn_hidden" a layout (jtp.plans.llama does).
        h_bh = shard_activation(h_bh, "ffn_hidden")
        return per_token(self.w2, h_bh)  # (..., dim)
