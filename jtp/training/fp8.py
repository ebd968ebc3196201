"""float8 matmuls with per-tensor current scaling: the arithmetic of the "transformer-engine"
precision (:mod:`jtp.training.precision` says where it is used).

A float8 number has 3 mantissa bits (``float8_e4m3fn``, largest 448) or 2 (``float8_e5m2``,
largest 57344), so a tensor is *scaled* into the format's range before the cast and the
product is scaled back: ``x ~ q * s`` with ``s = amax(|x|) / finfo(dtype).max``. Hopper's
tensor cores multiply two float8 operands at twice bf16's rate and accumulate in float32;
XLA's GPU backend rewrites a ``dot_general`` whose operands are both float8 into cuBLASLt's
fp8 GEMM (whether it also folds the scale multiply after it into the call is for a GPU run
to show: ``python -m jtp.bench gpu --precision bf16-mixed,transformer-engine``).

Scaling is *current* (torchtitan's default "tensorwise", TransformerEngine's
``Float8CurrentScaling``): the scale is the amax of the tensor being cast, taken in float32
at the moment of use. Not delayed (a scale from an amax history of earlier steps, Flax's
``fp8_ops`` and TransformerEngine's older default), because:

- there is no state: nothing to keep consistent across gradient accumulation, scanned
  layers (one history per layer, carried through the scan), rematerialisation (a recomputed
  forward must see the same scale), resharding and resumes; the checkpoint holds no fp8
  state and a run resumes exactly as under bf16;
- no overflow after an activation spike: a history scale is the past's, and a value larger
  than the past's amax saturates (clips) until the history catches up;
- the cost is one amax reduction per operand, which XLA fuses into the cast's pass over the
  tensor; for a sharded operand XLA adds a scalar all-reduce (max) across its shards.

Forward: both operands in e4m3 (more precision, range enough for activations and weights).
Backward: the incoming gradient in e5m2 (gradients span a wider range: 5 exponent bits) with
its own current scale, for both the input-gradient and the weight-gradient matmuls; the
forward's e4m3 operands are kept as the residuals (half the bytes of bf16 ones) and reused.

Functions, no modules: ``dot_general`` has ``jax.lax.dot_general``'s signature so it can be
handed to ``nnx.Linear(dot_general=...)`` / ``nnx.LinearGeneral``, and ``einsum`` is
``jnp.einsum`` with it inside, for ``nnx.Einsum(einsum_op=...)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn  # forward operands: 4 exponent bits, 3 mantissa bits, max 448
E5M2 = jnp.float8_e5m2  # gradients: 5 exponent bits, 2 mantissa bits, max 57344


def quantize(x: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(q, scale)`` with ``x ~ q.astype(float32) * scale``: ``q`` in the float8 ``dtype``,
    ``scale`` a float32 scalar, ``amax(|x|) / finfo(dtype).max`` (the largest element lands
    on the format's largest value). An all-zero ``x`` gets scale 1; a non-finite amax gives
    a non-finite scale, so an overflow upstream shows in the loss as it would in bf16."""
    largest = float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)  # exact: the max of x's own values
    scale = jnp.where(amax > 0, amax / largest, jnp.float32(1.0))
    q = jnp.clip(x.astype(jnp.float32) / scale, -largest, largest).astype(dtype)
    return q, scale


def _scaled_dot(a, b, dims, a_scale, b_scale, out_dtype, precision=None, out_sharding=None):
    """``dot_general`` of two float8 operands times both scales, in ``out_dtype``.

    The product is accumulated in float32 (the tensor cores do) and *written* in
    ``out_dtype`` (bf16 under the policy), as a bf16 matmul's is: where the contracted
    dimension is split over devices (a row-parallel layer, a weight gradient over "data"),
    XLA all-reduces the dot's output, so a float32 output would double those bytes. The
    scales are applied after, in float32 (one more bf16 rounding, 2^-9 relative: a
    thirty-second of e4m3's)."""
    y = jax.lax.dot_general(
        a,
        b,
        dims,
        precision=precision,
        preferred_element_type=out_dtype,
        out_sharding=out_sharding,
    )
    return (y.astype(jnp.float32) * (a_scale * b_scale)).astype(out_dtype)


def _kept(ndim: int, contract: tuple, batch: tuple) -> list[int]:
    return [i for i in range(ndim) if i not in contract and i not in batch]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fp8_dot(lhs, rhs, dims, out_dtype, out_sharding):
    return _fp8_dot_fwd(lhs, rhs, dims, out_dtype, out_sharding)[0]


def _fp8_dot_fwd(lhs, rhs, dims, out_dtype, out_sharding):
    q_lhs, s_lhs = quantize(lhs, E4M3)
    q_rhs, s_rhs = quantize(rhs, E4M3)
    y = _scaled_dot(q_lhs, q_rhs, dims, s_lhs, s_rhs, out_dtype, out_sharding=out_sharding)
    # Residuals: the e4m3 operands (1 byte an element) and their scales; the original
    # operands' dtypes ride along as zero-size arrays (a residual must be a jax type).
    like = (jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))
    return y, (q_lhs, s_lhs, q_rhs, s_rhs, like)


def _fp8_dot_bwd(dims, out_dtype, out_sharding, res, g):
    q_lhs, s_lhs, q_rhs, s_rhs, (lhs_like, rhs_like) = res
    q_g, s_g = quantize(g, E5M2)
    (lc, rc), (lb, rb) = dims
    lc, rc, lb, rb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    lhs_kept = _kept(q_lhs.ndim, lc, lb)
    rhs_kept = _kept(q_rhs.ndim, rc, rb)
    nb = len(lb)  # g's dims: (batch..., lhs kept..., rhs kept...)
    g_batch = tuple(range(nb))
    g_lhs = tuple(range(nb, nb + len(lhs_kept)))
    g_rhs = tuple(range(nb + len(lhs_kept), q_g.ndim))
    # HIGHEST: no fast (reduced-precision) accumulation for the gradients, as Flax's fp8
    # backward and TransformerEngine do; the forward keeps cuBLASLt's default.
    hi = jax.lax.Precision.HIGHEST

    # d lhs = g . rhs over rhs's kept dims -> (batch, lhs kept, rhs's contracted dims in
    # rhs's order), then permuted into lhs's layout.
    d = _scaled_dot(
        q_g, q_rhs, ((g_rhs, tuple(rhs_kept)), (g_batch, rb)), s_g, s_rhs, lhs_like.dtype, hi
    )
    src = [*lb, *lhs_kept, *(lc[rc.index(r)] for r in sorted(rc))]
    d_lhs = jax.lax.transpose(d, tuple(np.argsort(src)))

    # d rhs = g . lhs over lhs's kept dims -> (batch, rhs kept, lhs's contracted dims in
    # lhs's order), then permuted into rhs's layout.
    d = _scaled_dot(
        q_g, q_lhs, ((g_lhs, tuple(lhs_kept)), (g_batch, lb)), s_g, s_lhs, rhs_like.dtype, hi
    )
    src = [*rb, *rhs_kept, *(rc[lc.index(c)] for c in sorted(lc))]
    d_rhs = jax.lax.transpose(d, tuple(np.argsort(src)))
    return d_lhs, d_rhs


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``jax.lax.dot_general`` computed in float8 (e4m3 forward, e5m2 gradients), each
    operand with its current per-tensor scale. The result has ``preferred_element_type``,
    else the operands' promoted dtype (bf16 under the policy). ``precision`` is ignored: the
    operands' float8 format is the precision."""
    del precision
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return _fp8_dot(lhs, rhs, dims, jnp.dtype(out_dtype), out_sharding)


def einsum(subscripts: str, *operands: jax.Array, **kwargs: Any) -> jax.Array:
    """``jnp.einsum`` whose contractions are :func:`dot_general` (for ``nnx.Einsum``)."""
    kwargs.pop("precision", None)
    return jnp.einsum(subscripts, *operands, _dot_general=dot_general, **kwargs)
