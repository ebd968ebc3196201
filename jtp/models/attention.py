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
"""

from __future__ import annotations

import logging
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
) -> tuple[str, str]:
    """``(implementation, why)`` for ``requested`` in ``ATTENTION`` on ``platform``
    ("cpu", "gpu", "tpu") with inputs of ``dtype``; ``"cudnn"`` asked for where it cannot
    run is a ``ValueError`` saying why (before anything compiles)."""
    if requested not in ATTENTION:
        raise ValueError(f"attention={requested!r} must be one of {ATTENTION}")
    if requested in ("xla", "blockwise"):
        return requested, f"attention={requested!r} asked for"
    limit = cudnn_head_dim_limit(compute_capability)
    if platform != "gpu":
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
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the kernel :func:`choose_attention` picks for
    this backend and these inputs: (B, T, H, E) queries, (B, S, K, E) keys and values
    (grouped-query: query head h uses kv head h // (H / K)) -> (B, T, H, E)."""
    platform, capability = _device_facts()
    impl, why = choose_attention(
        implementation, platform=platform, dtype=q_bthe.dtype, head_dim=q_bthe.shape[-1],
        compute_capability=capability,
    )  # fmt: skip
    if (impl, why) not in _announced:
        _announced.add((impl, why))
        log.info("attention: %s (%s)", impl, why)
    if impl == "blockwise":
        return blockwise_attention(
            q_bthe, k_bske, v_bske, is_causal=is_causal, local_window_size=local_window_size
        )
    return jax.nn.dot_product_attention(
        q_bthe, k_bske, v_bske, is_causal=is_causal, local_window_size=local_window_size,
        implementation=impl,
    )  # fmt: skip
