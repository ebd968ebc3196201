"""Gemma's RMSNorm: ``x / rms(x) * (1 + scale)``, all of it in float32.

Llama's norm multiplies by ``scale`` (initialised to 1) and Flax's ``nnx.RMSNorm`` does that.
Gemma 2 and 3 store the *offset* from 1 (initialised to 0) and, unlike Llama, multiply in
float32 before casting back (transformers' ``Gemma2RMSNorm``: "(x * w).to(float16)", not
"x.to(float16) * w"). Trained Gemma scales sit around 0, so using them as Llama scales would
all but zero every normalised activation. The parameter keeps Flax's name ``scale`` (paths
such as ``layers.attention_norm.scale``, plans and the HF name map stay as they are), and the
class stays an ``nnx.RMSNorm`` so a precision policy sets its compute dtype like any stock
norm's (:mod:`jtp.training.precision`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class OffsetRMSNorm(nnx.RMSNorm):
    """RMSNorm over the last axis scaling by ``1 + scale``, in float32; the result in the
    compute ``dtype`` (None: the input's and the scale's promoted dtype).

    Example::

      norm = OffsetRMSNorm(64, epsilon=1e-6, rngs=nnx.Rngs(0))  # scale starts at 0: x / rms(x)
      y = norm(jnp.ones((2, 8, 64)))
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_init=nnx.initializers.zeros,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            raise ValueError("OffsetRMSNorm: masked statistics are not supported")
        scale = self.scale[...]
        out_dtype = self.dtype or jnp.promote_types(x.dtype, scale.dtype)
        x_f32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
        y = x_f32 * jax.lax.rsqrt(var + self.epsilon)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(out_dtype)
