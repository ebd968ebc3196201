"""What one layout costs: compile jtp's Llama train step abstractly for it,
at the model's whole depth, and read per-device memory, matmul FLOPs by dtype and collective
bytes per mesh axis off the program.

It compiles the step ``fit`` runs, layers scanned, whole: one loop body whatever the depth,
so compiling all 32 or 80 layers costs what one layer does (``python -m jtp.bench
compile``); its FLOPs are read off the jaxpr with every trip counted and its collectives are
counted once per trip. Earlier versions compiled 1- and 2-layer unrolled twins and
extrapolated, which an H200 showed wrong twice over (``bench_results/gpu.json``,
docs/performance.md): a scan stacks what the backward needs where XLA frees and fuses an
unrolled block's intermediates (the layout the twin's figures fitted into 104.9 GiB
compiled to 135 GiB scanned), and the peak moves with depth, from the loss at 2 layers to
the backward loop a few layers on, so a line through shallow points misses the deep one
(2 -> 3 layers added 2.6 GiB on the GPU, each layer from 16 to 32 added 3.9).

Used by :func:`jtp.capacity.planner` and ``python -m jtp.bench gpu``.
On CPU devices the compile sizes what a GPU runs (:data:`AS_ON_GPU`):
bf16 buffers at 2 bytes, no float32 copies of the logits that only the CPU's reductions
need, and, where a GPU takes cuDNN's fused attention, jtp's blockwise kernel with the same
O(T) memory (:func:`compiled_attention`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jtp.analysis.collectives import collectives
from jtp.analysis.dtypes import dot_flops_by_dtype, is_float8, total
from jtp.analysis.memory import KEEP_BF16, peak_memory_per_device
from jtp.capacity.roofline import ring_factor
from jtp.mesh import CONTEXT, DATA, EXPERT, TENSOR
from jtp.models.attention import choose_attention
from jtp.models.hf import config_of
from jtp.models.plans import replicate_kv
from jtp.recipes import LlamaTaskConfig
from jtp.recipes.llama import preset_config, trace_llama_step
from jtp.training.precision import policy

# Compiler options for sizing on CPU what a GPU runs. KEEP_BF16 (bf16 buffers at 2 bytes),
# and two rewrites of XLA's CPU backend off that leave whole buffers where a GPU's fusion
# leaves none: "tree_reduction_rewriter" splits every long reduction into a reduce-window
# and a reduce, into which the CPU's fusion fuses no producer; the YNNPACK library fusions
# ("__ynn_fusion" in the HLO: the CPU's dots and reductions) take their operands as
# buffers. With them, a bf16 -> float32 convert or a broadcast feeding a reduction becomes a
# buffer of its own: in the Llama step the float32 copy of the bf16 logits (B, T, V) that
# the cross-entropy reduces, the float32 one-hot of the labels and their product, which a
# GPU computes inside its reduction kernels. At T = 8192 and vocabulary 128,256 they are
# 4.2 GB each; the CPU's peak, at the loss, held all three (its buffer assignment), and
# without the rewrites it holds one float32 (T, V) buffer, the exp of the logits; the
# H200's compiled peak leaves no room for the others (docs/planning.md). Llama-3-8B cut to
# 16 layers, bench_results/gpu.json's layout, then sizes 88.3 GB instead of 97.2, where
# XLA compiled 83.4 GB for an H200 (at 32 layers 155.4 against 150.3); the layers' part is
# the same either way (4.19 GB per layer). A float32 program changes too (the one-hot is
# float32 whatever the precision). tests/capacity/test_capacity.py checks the difference
# on a small step.
AS_ON_GPU = {
    "xla_disable_hlo_passes": KEEP_BF16["xla_disable_hlo_passes"] + ",tree_reduction_rewriter",
    "xla_cpu_experimental_ynn_fusion_type": "",  # empty: no YNNPACK fusion
}

BUCKETS = ("tensor", "data", "both", "expert", "context")
# The axes that split the tokens: the weights' gradients are summed over them.
BATCH_AXES = frozenset({DATA, EXPERT, CONTEXT})


def bucket(record: Any) -> str:
    """The planner's name for a collective's traffic, by its mesh axes and kind:

    - ``"expert"``: an all-to-all over axes holding "expert" (a MoE layer's token exchange,
      charged at the link its expert x tensor group spans);
    - ``"context"``: anything but an all-reduce over "context" (with or without "tensor")
      and no batch axis: the K/V all-gathers of context parallelism and their gradients'
      reduce-scatters (charged at the link a context x tensor group spans);
    - else ``"tensor"`` (over "tensor" alone, or no axis: a 1-device group, free),
      ``"data"`` (over axes that split the tokens: "data", "expert", "context", the
      gradient sums and fsdp's gathers) or ``"both"`` (those and "tensor")."""
    axes = set(record.axes or ())
    if EXPERT in axes and record.kind == "all-to-all":
        return "expert"
    if CONTEXT in axes and record.kind != "all-reduce" and axes <= {CONTEXT, TENSOR}:
        return "context"
    if not axes & BATCH_AXES:
        return "tensor"
    return "both" if TENSOR in axes else "data"


def compiled_attention(
    requested: str, precision: str, head_dim: int, platform: str, softcap: float | None = None
) -> str:
    """The attention the planner compiles for ``requested``: on a CPU, ``"auto"`` means what
    a Hopper GPU would run: cuDNN's fused kernel (O(T) memory) where it takes these inputs,
    for which jtp's ``"blockwise"`` kernel stands in, XLA's O(T^2) path otherwise (fp32, or
    scores soft-capped at ``softcap``: Gemma 2)."""
    if requested != "auto" or platform != "cpu":
        return requested
    gpu, _ = choose_attention(
        "auto",
        platform="gpu",
        dtype=policy(precision).compute_dtype,
        head_dim=head_dim,
        compute_capability="9.0",
        softcap=softcap,
    )
    return "blockwise" if gpu == "cudnn" else "xla"


def measure(
    layout: Any,
    preset: str,
    n_layers: int,
    seq: int,
    micro_batch: int,
    precision: str,
    devices: list,
    accumulate: int = 1,
    hf: str | None = None,
    attention: str = "auto",
    *,
    as_gpu: bool = True,
) -> dict[str, Any]:
    """Compile one :class:`~jtp.capacity.planner.Layout` with ``n_layers`` scanned blocks and
    ``accumulate`` micro-batches per optimizer step (as the trainer runs it); figures per
    device and per optimizer step: memory (accumulation buffer included), collective bytes
    by :func:`bucket` (``bytes_expert``: the MoE layers' all-to-alls over an "expert" axis;
    ``bytes_context``: the K/V gathers over a "context" axis and their gradients' scatters;
    loop bodies counted once per trip), and the matmul FLOPs of the traced step (scan
    bodies once per trip; the backward and remat's recomputation included), all and those
    with 16-bit operands (``flops_bf16``) and with float8 ones (``flops_float8``).
    Elementwise FLOPs are left out: they are memory-bound, and XLA's cost analysis, which
    counts them, counts a loop body once.

    On CPU devices the compile sizes what a GPU holds (:data:`AS_ON_GPU`: bf16 buffers at 2
    bytes, no CPU-only float32 copies) and attention is :func:`compiled_attention`'s;
    ``as_gpu=False`` compiles with the CPU's own options instead, the program ``fit`` runs
    on these CPU devices (what tests compare with the trainer). ``hf``: the shapes of that
    Hugging Face checkpoint instead of ``preset``'s.
    """
    platform = devices[0].platform
    expert = getattr(layout, "expert", 1)
    context = getattr(layout, "context", 1)
    model = config_of(hf, max_seq_len=seq) if hf else preset_config(preset)
    task_config = LlamaTaskConfig(
        preset=preset,
        hf=hf,
        seq_len=seq,
        batch_size=micro_batch * layout.data * expert,
        fsdp=layout.fsdp,
        sequence_parallel=layout.sequence_parallel,
        loss_parallel=layout.tensor > 1,
        remat=layout.remat,
        attention=compiled_attention(
            attention, precision, model.head_dim, platform, model.attn_softcap
        ),
    )
    # on a context axis the batch is the loader's balanced pieces (inputs, labels and
    # positions, T split over "context") and attention gathers K and V over the axis and
    # attends by position: the blockwise kernel on CPU is then what a GPU runs too (cuDNN's
    # fused kernel cannot attend by position)
    traced, mesh = trace_llama_step(
        task_config,
        (layout.data, layout.tensor),
        devices,
        precision=precision,
        n_layers=n_layers,
        accumulate=accumulate,
        expert=expert,
        context=context,
    )
    compiled = traced.lower().compile(AS_ON_GPU if platform == "cpu" and as_gpu else None)
    records = collectives(compiled, mesh)
    by_axis = dict.fromkeys(BUCKETS, 0.0)
    wire = dict.fromkeys(BUCKETS, 0.0)
    for c in records:
        n = int(np.prod([mesh.shape[a] for a in c.axes or ()]))
        by_axis[bucket(c)] += float(c.bytes)
        wire[bucket(c)] += c.bytes * ring_factor(c.kind, n)
    # The jaxpr is the global program: every Llama matmul is split over all devices (batch
    # over "data"; heads, features or vocabulary over "tensor"), so a device does 1 / n.
    flops = {k: v / mesh.size for k, v in dot_flops_by_dtype(traced.jaxpr).items()}
    return {
        "memory": float(peak_memory_per_device(compiled)),
        "flops": float(sum(flops.values())),
        "flops_bf16": total(flops, lambda k: k in ("bfloat16", "float16")),
        "flops_float8": total(flops, is_float8),
        **{f"bytes_{k}": v for k, v in by_axis.items()},
        **{f"wire_{k}": v for k, v in wire.items()},
    }


def analytic_floor(model: Any, n_devices: int, layout: Any, precision: str) -> float:
    """(params + grads + 2 AdamW moments) bytes per device, fp32 state, for the Llama
    config ``model``: every parameter split ``tensor`` ways (and ``data`` ways with fsdp),
    except ``wk`` / ``wv`` where the tensor axis is wider than the kv heads: those are
    replicated over "tensor" (:func:`jtp.plans.replicate_kv`), a whole copy on each device.
    A "context" axis splits no parameter (fsdp shards over the batch axes, which it is
    not): every device of a context group holds the same state."""
    per_param = 16 if precision != "bf16-true" else 8
    shards = n_devices // getattr(layout, "context", 1) if layout.fsdp else layout.tensor
    kv = 0
    if layout.tensor > model.n_kv_heads:  # wk, wv (and their biases) on every tensor rank
        kv = model.n_layers * 2 * model.n_kv_heads * model.head_dim * (model.dim + model.qkv_bias)
    split = model.num_params() - kv - model.num_expert_params()
    dense = (split / shards + kv * layout.tensor / shards) * per_param
    return dense + expert_floor(model, n_devices, layout, precision)


def expert_floor(model: Any, n_devices: int, layout: Any, precision: str) -> float:
    """The stacked experts' share of :func:`analytic_floor`: their (params + grads + 2 AdamW
    moments) bytes per device, fp32 state, under the placement the plans give them (split
    on E over "tensor" when it divides E, else on each expert's F: ``tensor`` ways either
    way; and ``data`` ways with fsdp). 0 for a dense model. With an "expert" mesh axis of
    size X the experts are split on E over it too (``P("expert", None, "tensor")``: E / X
    experts per device, each F / tensor wide), so X times less; fsdp shards them over all
    devices but a "context" axis either way."""
    per_param = 16 if precision != "bf16-true" else 8
    expert = getattr(layout, "expert", 1)
    shards = n_devices // getattr(layout, "context", 1) if layout.fsdp else layout.tensor * expert
    return model.num_expert_params() / shards * per_param


def kv_exchange_bytes(model: Any, config: Any, seq: int, micro_batch: int, precision: str) -> float:
    """Bytes a device sends per micro-step for context parallelism's K/V exchange, by hand
    (ring all-gather and reduce-scatter, the planner's convention:
    :func:`jtp.capacity.roofline.ring_factor`). Per layer the forward all-gathers K and V
    over "context" and the backward reduce-scatters their gradients, each way
    ``2 x (C - 1) / C x B x T x K x E`` elements of the compute dtype: B the rows of a data
    rank, T the whole sequence, K the kv heads a device holds (its tensor rank's share; kv
    heads are replicated where tensor is wider, :func:`jtp.plans.replicate_kv`), E the
    head dim. A remat policy repeats the forward's gathers in the backward (the block's
    forward is recomputed from its input). 0 without a context axis."""
    c = getattr(config, "context", 1)
    if c == 1:
        return 0.0
    kv_local = replicate_kv(model, config.tensor).cached_kv_heads // config.tensor
    dtype = policy(precision).compute_dtype
    size = micro_batch * seq * kv_local * model.head_dim * np.dtype(dtype).itemsize
    gathers = 2 if config.remat != "none" else 1  # forward (and its recomputation)
    return model.n_layers * 2 * (gathers + 1) * (c - 1) / c * size
