"""What a compiled step holds in memory, per device, from XLA's buffer analysis.

Claims about memory are read off the program XLA will actually run
(``jax.jit(f).lower(...).compile()``), never assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jtp.parallel.plan import Placement, shard_shape

RNG_KEY_BYTES = 8  # a typed threefry key is two uint32 words

# Compiler options for sizing a bf16 program on CPU as an accelerator runs it. XLA's CPU
# backend implements few operations in bf16: its "float-normalization-bf16" pass rewrites
# every other bf16 operation to convert to float32, compute, and convert back, and later
# simplification drops the convert pairs, so bf16 buffers of the program become float32
# buffers and memory_analysis() counts them at 4 bytes. GPUs and TPUs run those operations
# in bf16. Without that one pass the CPU compiles the operations in the program's
# own types, and its buffer assignment counts bf16 values at 2 bytes; a float32 program is
# unchanged (tests/analysis/test_memory.py checks both).
KEEP_BF16 = {"xla_disable_hlo_passes": "float-normalization-bf16"}


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (typed RNG keys included): the one rule
    used for every per-device size jtp reports."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return int(np.prod(shape)) * RNG_KEY_BYTES
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def bytes_per_device(placements: Sequence[Placement], mesh: Mesh) -> int:
    """Sum of the per-device shard bytes of the given placements (:func:`jtp.resolve`)."""
    return sum(nbytes(shard_shape(p, mesh), p.dtype) for p in placements)


def memory_breakdown(compiled: Any) -> dict[str, int]:
    """Per-device bytes from ``memory_analysis()`` and their total (see
    :func:`peak_memory_per_device`): keys arguments, outputs, temps, aliased, total."""
    ma = compiled.memory_analysis()
    parts = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "temps": int(ma.temp_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
    }
    parts["total"] = parts["arguments"] + parts["outputs"] + parts["temps"] - parts["aliased"]
    return parts


def peak_memory_per_device(compiled: Any) -> int:
    """Bytes one device holds while running ``compiled``: arguments + outputs + temporaries
    - aliases (an output written into a donated input is counted once).

    This is everything XLA allocates on the device for the step (temporaries are already
    packed with reuse into one ``temp`` block). Not ``memory_analysis().peak_memory_in_bytes``:
    on CPU it leaves the temporaries out.
    """
    return memory_breakdown(compiled)["total"]


def device_peak_bytes() -> int | None:
    """Largest allocator peak over local devices (GPU), or None where the backend keeps no
    statistics (CPU's ``memory_stats()`` is None)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return max((int(p) for p in peaks if p is not None), default=None)


def memory_report(compiled_peak_bytes: int) -> str:
    """``[device i] Peak memory usage: X GB`` per local device, as Lightning's example prints.

    Backends with allocator statistics (GPU) report the measured peak; on CPU the figure is
    the compiled step's footprint per device (arguments + outputs + temporaries - donated
    aliases), which is what each device must hold at the step's peak.
    """
    lines = []
    measured = device_peak_bytes() is not None
    for d in jax.local_devices():
        if measured:
            value, how = (d.memory_stats() or {}).get("peak_bytes_in_use", 0), "allocator peak"
        else:
            value, how = compiled_peak_bytes, "compiled step"
        lines.append(
            f"[device {d.id}] Peak memory usage: {value / 1e9:.2f} GB "
            f"({value / 2**20:.1f} MiB, {how})"
        )
    return "\n".join(lines)
