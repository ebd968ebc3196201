"""The planner's device model: usable memory and the roofline that turns a step's FLOPs and
collective bytes into an estimated time.

Usable memory is what jax may allocate, not what the device has: jax on a GPU preallocates
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.75) of each device's memory and allocates
from that pool only, so a step that needs 70 of 80 GB does not start.

Matmul FLOPs run at the bf16 dense peak only where both operands are 16-bit floats. Float32
matmuls run at ``fp32_ratio`` of it: on a GPU, jax computes float32 dots with TF32 tensor
cores by default (the "DEFAULT" precision), whose dense peak is half the bf16 one on A100
(156 vs 312 TFLOP/s), H100/H200 (495 vs 989) and B200 (1,100 vs 2,250); hence 0.5. With
``jax_default_matmul_precision="highest"`` (true float32, no tensor cores) the ratio is
about 0.07 on an H100 (67 vs 989): pass it. Matmuls with float8 operands (the
"transformer-engine" precision's) run at ``fp8_ratio`` of the bf16 peak: twice it on H100
and H200 (1,979 vs 989 TFLOP/s dense) and B200 (4,500 vs 2,250).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

GB = 1e9
MEM_FRACTION = 0.75  # jax's GPU preallocation when XLA_PYTHON_CLIENT_MEM_FRACTION is unset
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
TF32_RATIO = 0.5  # TF32 / bf16 dense peak on A100, H100, H200 (B200: 0.49)
FP8_RATIO = 2.0  # float8 / bf16 dense peak on H100, H200, B200 (A100: no float8)


def default_mem_fraction() -> float:
    """The share of device memory jax preallocates: ``$XLA_PYTHON_CLIENT_MEM_FRACTION`` if
    set (as jax reads it), else 0.75."""
    value = os.environ.get(MEM_FRACTION_ENV)
    if not value:
        return MEM_FRACTION
    fraction = float(value)
    if not 0 < fraction <= 1:
        raise ValueError(f"{MEM_FRACTION_ENV}={value}: must be in (0, 1]")
    return fraction


@dataclasses.dataclass(frozen=True)
class Hardware:
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    compute_efficiency: float = 0.5  # fraction of peak a real step reaches
    intra_host_gbps: float = 450.0  # NVLink, per direction per GPU (tensor axis)
    inter_host_gbps: float = 50.0  # per GPU across hosts (400 Gb/s NICs)
    memory_gb: float = 80.0  # per device
    mem_fraction: float = MEM_FRACTION  # of memory_gb that jax may allocate (preallocation)
    fp32_ratio: float = TF32_RATIO  # float32 matmul peak / bf16 peak (TF32 tensor cores)
    fp8_ratio: float = FP8_RATIO  # float8 matmul peak / bf16 peak

    @property
    def usable_bytes(self) -> float:
        """Bytes a step may use per device: memory x preallocation fraction."""
        return self.memory_gb * GB * self.mem_fraction


def ring_factor(kind: str, n: int) -> float:
    """Bytes a device sends per byte of (full) buffer in a ring implementation."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n


def link_gbps(group: int, per_host: int, hw: Hardware) -> float:
    """The bandwidth of a group of ``group`` consecutive devices (an axis with the axes
    inside it: the mesh is row-major, tensor innermost): in-host while it fits a host."""
    return hw.inter_host_gbps if group > per_host else hw.intra_host_gbps


def estimate(m: dict[str, float], config: Any, hw: Hardware, per_host: int) -> dict[str, float]:
    """Roofline seconds per optimizer step (``m`` is per optimizer step already): matmul
    FLOPs with 16-bit operands (``flops_bf16``) at the bf16 peak, those with float8 ones
    (``flops_float8``) at ``fp8_ratio`` of it, the others at ``fp32_ratio`` of it, all at
    ``compute_efficiency``; plus the wire bytes of the tensor
    axis at the in-host bandwidth, of the data axis (data-like collectives over "expert" or
    "context" included: the gradient sums) at the bandwidth the whole mesh spans, of the MoE
    all-to-alls over an "expert" axis (``wire_expert``) at the in-host bandwidth when an
    expert x tensor group fits in a host, else the across-host one, and of the exchanges
    over a "context" axis (``wire_context``: the K/V gathers and their gradients'
    scatters) at the in-host bandwidth when a context x tensor group fits in a host, else
    the across-host one; no overlap."""
    rate = hw.peak_tflops * 1e12 * hw.compute_efficiency
    low, f8 = m.get("flops_bf16", 0.0), m.get("flops_float8", 0.0)
    rest = m["flops"] - low - f8
    compute = low / rate + f8 / (rate * hw.fp8_ratio) + rest / (rate * hw.fp32_ratio)
    expert = getattr(config, "expert", 1)
    context = getattr(config, "context", 1)
    data_bw = link_gbps(config.data * expert * context * config.tensor, per_host, hw)
    expert_bw = link_gbps(expert * config.tensor, per_host, hw)
    context_bw = link_gbps(context * config.tensor, per_host, hw)
    comm = (
        m["wire_tensor"] / (hw.intra_host_gbps * 1e9)
        + (m["wire_data"] + m["wire_both"]) / (data_bw * 1e9)
        + m.get("wire_expert", 0.0) / (expert_bw * 1e9)
        + m.get("wire_context", 0.0) / (context_bw * 1e9)
    )
    return {"compute_s": compute, "comm_s": comm, "step_s": compute + comm}
