"""Which attention kernel runs: cuDNN's fused (flash) attention where it can, XLA's otherwise.

``jax.nn.dot_product_attention(implementation=None)`` is XLA's reference path on every
backend, GPUs included: it materialises the (B, H, T, S) scores and saves them for the
backward, O(T^2) memory per layer. ``implementation="cudnn"`` runs cuDNN's fused kernel,
O(T) memory, but only on an NVIDIA GPU, for bf16/fp16 inputs and head dims it supports, and
jax's partitioning rule for it accepts heads sharded on "tensor" and batch on "data" (jtp's
"heads" rule) but refuses a sharded sequence. ``"auto"`` takes cuDNN exactly when all of
that holds and says once, in the log, which it chose and why. ``"blockwise"`` is jtp's
flash-style attention in pure JAX (:mod:`jtp.models.blockwise`): O(T) memory on every
backend, for long sequences on CPUs, and what the capacity planner compiles on CPU to stand
for cuDNN's kernel.

Gemma 2 soft-caps the scores (``tanh(s / cap) * cap`` before the mask), which neither
``jax.nn.dot_product_attention`` nor cuDNN's kernel computes: with a ``softcap``, "xla" is
:func:`softcapped_attention` (XLA's arithmetic written out, the cap added) and "auto" never
takes cuDNN; "blockwise" caps inside its tiles. Sliding windows (``local_window_size``) and
a score scale other than ``head_dim ** -0.5`` (``scale``) every kernel takes.

Attention over a key/value cache (:func:`masked_attention`: the padding of left-padded
prompts and the unwritten slots are masked, per sequence) takes an explicit (B, T, S) mask,
which only XLA's kernel accepts: the fused ones take causal and window masks only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from jtp.models.blockwise import blockwise_attention

ATTENTION = ("auto", "xla", "cudnn", "blockwise")
CUDNN_DTYPES = ("bfloat16", "float16")

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()


def cudnn_head_dim_limit(compute_capability: str | None) -> int:
    """The largest head dim cuDNN's flash attention takes: 256 from Hopper (9.0) on, else 128."""
    if compute_capability is None:
        return 128
    major = int(str(compute_capability).split(".")[0])
    return 256 if major >= 9 else 128


def choose_attention(
    requested: str,
    *,
    platform: str,
    dtype: Any,
    head_dim: int,
    compute_capability: str | None = None,
    softcap: float | None = None,
) -> tuple[str, str]:
    """``(implementation, why)`` for ``requested`` in ``ATTENTION`` on ``platform``
    ("cpu", "gpu", "tpu") with inputs of ``dtype`` and scores soft-capped at ``softcap``
    (None: not capped); ``"cudnn"`` asked for where it cannot run is a ``ValueError``
    saying why (before anything compiles)."""
    if requested not in ATTENTION:
        raise ValueError(f"attention={requested!r} must be one of {ATTENTION}")
    if requested in ("xla", "blockwise"):
        return requested, f"attention={requested!r} asked for"
    limit = cudnn_head_dim_limit(compute_capability)
    if softcap is not None:
        why = f"scores soft-capped at {softcap}: cuDNN's kernel has no soft-capping"
    elif platform != "gpu":
        why = f"no GPU (platform {platform!r}): cuDNN runs on NVIDIA GPUs only"
    elif jnp.dtype(dtype).name not in CUDNN_DTYPES:
        why = f"{jnp.dtype(dtype).name} inputs: cuDNN attention takes bf16 or fp16"
    elif head_dim % 8 or head_dim > limit:
        why = f"head dim {head_dim}: cuDNN takes multiples of 8 up to {limit} on this GPU"
    else:
        return "cudnn", f"GPU, {jnp.dtype(dtype).name}, head dim {head_dim}: fused attention"
    if requested == "cudnn":
        raise ValueError(f"attention='cudnn' cannot run here: {why}; use 'auto' or 'xla'")
    return "xla", why


def _device_facts() -> tuple[str, str | None]:
    device = jax.devices()[0]
    return device.platform, getattr(device, "compute_capability", None)


def attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    *,
    implementation: str = "auto",
    is_causal: bool = True,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the kernel :func:`choose_attention` picks for
    this backend and these inputs: (B, T, H, E) queries, (B, S, K, E) keys and values
    (grouped-query: query head h uses kv head h // (H / K)) -> (B, T, H, E). ``scale``
    multiplies the scores (None: ``E ** -0.5``); ``softcap``: scores ``tanh(s / cap) * cap``
    before the mask (Gemma 2)."""
    platform, capability = _device_facts()
    impl, why = choose_attention(
        implementation,
        platform=platform,
        dtype=q_bthe.dtype,
        head_dim=q_bthe.shape[-1],
        compute_capability=capability,
        softcap=softcap,
    )
    if (impl, why) not in _announced:
        _announced.add((impl, why))
        log.info("attention: %s (%s)", impl, why)
    if impl == "blockwise":
        return blockwise_attention(
            q_bthe,
            k_bske,
            v_bske,
            is_causal=is_causal,
            local_window_size=local_window_size,
            scale=scale,
            softcap=softcap,
        )
    if softcap is not None:
        return softcapped_attention(
            q_bthe,
            k_bske,
            v_bske,
            is_causal=is_causal,
            local_window_size=local_window_size,
            scale=scale,
            softcap=softcap,
        )
    return jax.nn.dot_product_attention(
        q_bthe,
        k_bske,
        v_bske,
        is_causal=is_causal,
        local_window_size=local_window_size,
        scale=scale,
        implementation=impl,
    )


def positioned_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    q_pos_t: jax.Array,
    k_pos_s: jax.Array,
    *,
    implementation: str = "auto",
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal attention where query t sits at position ``q_pos_t[t]`` and key s at
    ``k_pos_s[s]`` ((T,) and (S,) int, in any order, shared by every row): query t sees the
    keys at positions ``q - window < k <= q`` (``window`` None: every earlier one).

    What context parallelism runs (:mod:`jtp.parallel.context`: a device's pieces of the
    sequence against every key), and a single device given a batch in that order. The
    blockwise kernel skips each tile no pair of which attends; XLA's (also for "auto":
    cuDNN's kernel takes no mask, and its causal mask compares indices) computes the
    (T, S) scores and masks them. (B, T, H, E) queries, (B, S, K, E) keys and values ->
    (B, T, H, E)."""
    left = None if window is None else window - 1
    if implementation == "blockwise":
        return blockwise_attention(
            q_bthe,
            k_bske,
            v_bske,
            is_causal=True,
            local_window_size=None if left is None else (left, 0),
            scale=scale,
            softcap=softcap,
            q_positions=q_pos_t,
            k_positions=k_pos_s,
        )
    if implementation == "cudnn":
        raise ValueError(
            "attention='cudnn' cannot attend by position (context parallelism's pieces): "
            "cuDNN's causal mask compares indices and its kernel takes no mask; use 'auto', "
            "'xla' or 'blockwise'"
        )
    keep_ts = k_pos_s[None, :] <= q_pos_t[:, None]  # (T, S)
    if left is not None:
        keep_ts &= q_pos_t[:, None] - k_pos_s[None, :] <= left
    mask_bts = jnp.broadcast_to(keep_ts, (q_bthe.shape[0], *keep_ts.shape))
    return masked_attention(q_bthe, k_bske, v_bske, mask_bts, scale=scale, softcap=softcap)


def masked_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    mask_bts: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention of (B, T, H, E) queries over (B, S, K, E) keys and values
    where ``mask_bts`` ((B, T, S) bool) is True -> (B, T, H, E): XLA's kernel (the fused
    ones take no mask), or :func:`softcapped_attention` with a ``softcap`` (no jax kernel
    caps the scores). ``scale``: as :func:`attention`'s."""
    if softcap is not None:
        return softcapped_attention(
            q_bthe,
            k_bske,
            v_bske,
            softcap=softcap,
            scale=scale,
            is_causal=False,
            mask_bts=mask_bts,
        )
    mask_b1ts = mask_bts[:, None, :, :]  # (B, 1, T, S): one mask for every head
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask_b1ts, scale=scale)


def softcapped_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    *,
    softcap: float,
    scale: float | None = None,
    is_causal: bool = True,
    local_window_size: int | tuple[int, int] | None = None,
    mask_bts: jax.Array | None = None,
) -> jax.Array:
    """XLA's attention (``jax.nn.dot_product_attention(implementation="xla")``'s arithmetic:
    float32 scores of bf16 x bf16 products, softmax in float32, probabilities cast to the
    values' dtype) with the scores soft-capped, ``tanh(s * scale / cap) * cap``, before the
    masks: transformers' Gemma 2 order. Masks as ``jax.nn.dot_product_attention``'s
    (``is_causal``: key s <= query t; ``local_window_size`` (left, right): t - left <= s <=
    t + right; ``mask_bts``: (B, T, S) bool, True where a query may attend).
    Shapes: (B, T, H, E) queries, (B, S, K, E) keys and values -> (B, T, H, E)."""
    b, t, h, e = q_bthe.shape
    s, kv = k_bske.shape[1], k_bske.shape[2]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    # As jax's: bf16 x bf16 -> float32 named explicitly, so that the backward's products of
    # the float32 score gradients with bf16 q / k are bf16 ones too (jax issue 24047).
    precision = _PRESETS.get(jnp.dtype(q_bthe.dtype).name)
    q_btkre = q_bthe.reshape(b, t, kv, h // kv, e)  # (B, T, K, R, E): query h is (h // R, h % R)
    scores_bkrts = jnp.einsum(
        "btkre,bske->bkrts",
        q_btkre,
        k_bske,
        precision=precision,
        preferred_element_type=jnp.float32,
    ) * jnp.float32(scale)
    scores_bkrts = jnp.tanh(scores_bkrts / softcap) * softcap
    keep_ts = jnp.ones((t, s), bool)
    t_pos, s_pos = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    if is_causal:
        keep_ts &= s_pos <= t_pos
    if local_window_size is not None:
        left, right = (
            (local_window_size,) * 2 if isinstance(local_window_size, int) else local_window_size
        )
        keep_ts &= (t_pos <= s_pos + left) & (t_pos >= s_pos - right)
    keep = keep_ts[None, None, None]  # (1, 1, 1, T, S)
    if mask_bts is not None:
        keep = keep & mask_bts[:, None, None]  # (B, 1, 1, T, S)
    scores_bkrts = jnp.where(keep, scores_bkrts, _LARGE_NEGATIVE)
    probs_bkrts = jax.nn.softmax(scores_bkrts, axis=-1).astype(v_bske.dtype)
    out_btkre = jnp.einsum("bkrts,bske->btkre", probs_bkrts, v_bske)
    return out_btkre.reshape(b, t, h, e)  # (B, T, H, E)


_PRESETS = {
    "bfloat16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
    "float16": jax.lax.DotAlgorithmPreset.F16_F16_F32,
}
# jax's masked-score value (-0.7 x float32's max): finite, so a row with no key is uniform
# rather than nan, exactly as jax.nn.dot_product_attention's XLA path does.
_LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)
