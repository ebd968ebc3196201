"""XLA flags for NVIDIA GPUs: what each one buys, and a helper that sets them before jax starts.

XLA reads ``XLA_FLAGS`` once, when jax initialises its backends (the first device query or
computation, not ``import jax``), so these must be in the environment before that.
``python -m jtp.train`` and ``python -m jtp.bench`` call :func:`apply_gpu_flags` first thing;
your own script can too::

    import jtp
    jtp.apply_gpu_flags(sequence_parallel=True)   # before the first jax.devices()

Every flag here parses on the pinned jaxlib (a test starts a process with all of them);
``--xla_gpu_enable_async_collectives``, which many guides still recommend, is gone from it
and aborts the process at start, so it is not here (collectives are asynchronous by default).
A flag already in ``XLA_FLAGS`` is left as the user set it.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

COMBINE_BYTES = 1 << 30  # MaxText's GPU runs combine all-reduces up to 1 GiB

# (flag, why): always on a GPU.
GPU_FLAGS: tuple[tuple[str, str], ...] = (
    (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "schedule collectives to overlap with compute (off by default)",
    ),
    (
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "run collectives on a high-priority stream so compute kernels do not starve them",
    ),
    (
        f"--xla_gpu_all_reduce_combine_threshold_bytes={COMBINE_BYTES}",
        "combine the many small tensor-parallel and gradient all-reduces into few large ones",
    ),
    (
        f"--xla_gpu_all_gather_combine_threshold_bytes={COMBINE_BYTES // 8}",
        "combine FSDP parameter gathers (MaxText: the all-reduce threshold / GPUs per node)",
    ),
    (
        f"--xla_gpu_reduce_scatter_combine_threshold_bytes={COMBINE_BYTES // 16}",
        "combine FSDP gradient reduce-scatters (MaxText: half the all-gather threshold)",
    ),
    (
        "--xla_gpu_enable_pipelined_all_gather=true",
        "start a loop's next FSDP gather during the current iteration (scan, accumulation)",
    ),
    (
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "finish a loop iteration's reduce-scatter during the next one",
    ),
    ("--xla_gpu_enable_pipelined_all_reduce=true", "the same for all-reduces inside loops"),
    (
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "double-buffer loop-carried values so pipelined collectives have room to overlap",
    ),
)

# (flag, why): with sequence parallelism, whose all-gather / reduce-scatter feed matmuls.
SEQUENCE_PARALLEL_FLAGS: tuple[tuple[str, str], ...] = (
    (
        "--xla_gpu_threshold_for_windowed_einsum_mib=0",
        "collective matmul: split an all-gather or reduce-scatter feeding a matmul into "
        "steps overlapped with its pieces (never triggers at the default threshold)",
    ),
    ("--xla_gpu_multi_streamed_windowed_einsum=true", "run those steps on several streams"),
)

CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def gpu_flags(*, sequence_parallel: bool = False) -> list[str]:
    """The flags jtp sets on GPUs (with sequence parallelism, the collective-matmul ones)."""
    pairs = GPU_FLAGS + (SEQUENCE_PARALLEL_FLAGS if sequence_parallel else ())
    return [flag for flag, _ in pairs]


def cuda_jax_installed() -> bool:
    """Whether jax may run on NVIDIA GPUs here: a CUDA plugin is installed and
    ``JAX_PLATFORMS`` does not rule it out. Answered without initialising jax."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.replace(" ", "").split(",")):
        return False
    return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def apply_gpu_flags(*, sequence_parallel: bool = False, force: bool = False) -> list[str]:
    """Add :func:`gpu_flags` to ``XLA_FLAGS`` when jax may run on GPUs (or ``force``);
    flags the user already set keep their value. Returns the flags added. Warns if jax has
    already initialised (the flags would then take effect only in a new process)."""
    if not (force or cuda_jax_installed()):
        return []
    current = os.environ.get("XLA_FLAGS", "")
    have = {_name(f) for f in current.split()}
    added = [f for f in gpu_flags(sequence_parallel=sequence_parallel) if _name(f) not in have]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
        if _backends_initialised():
            warnings.warn(
                "jtp.apply_gpu_flags: jax has already initialised its backends, so the XLA "
                "flags take effect only in a new process; call it before the first "
                "jax.devices() or computation",
                stacklevel=2,
            )
    return added


def _backends_initialised() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())
