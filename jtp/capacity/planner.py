"""The capacity planner: every valid layout of a model on a cluster, each compiled and sized
(:mod:`jtp.capacity.measure`), timed by the roofline (:mod:`jtp.capacity.roofline`), ranked.

:func:`search` is what ``jtp capacity`` runs and prints (:func:`jtp.capacity.report.format_table`)::

    from jtp.capacity import Request, search
    table = search(Request(model="llama3-8b", devices=64, global_batch=256, seq_len=8192))
    print(table.format())          # the program's table
    table.recommended["label"]     # "8x8 fsdp,sp,remat=dots", say

A mixture of experts (``mixtral-8x7b``, ``qwen3-30b-a3b``, an HF MoE config) is sized the
same way, its experts laid out as the plans lay them (on E over "tensor", else on each
expert's F); the JSON adds ``moe`` (total, active and expert parameters) and each row
``expert_floor_bytes``. It also gets layouts with an "expert" mesh axis of every size X
dividing E with X x tensor in one host (:func:`layouts`; ``Request.expert`` restricts
them): experts split on E over it, tokens exchanged by all-to-alls, whose bytes each MoE row
carries (``expert_bytes_per_step``) and the roofline charges at the link the group spans;
the table says whether the axis pays (:func:`jtp.capacity.report.format_table`).

A long sequence gets layouts with a "context" mesh axis (context parallelism,
:mod:`jtp.parallel.context`): each sequence split into C pieces, one per device of a context
group, so every per-token activation per device is C times smaller, at the price of
all-gathering each layer's keys and values over the group (and reduce-scattering their
gradients). :func:`layouts` proposes every power of two C dividing the devices with T
divisible by 2C (the balanced order cuts T into 2C chunks) and pieces of at least
:data:`CONTEXT_MIN_PIECE` tokens; ``Request.context`` names the sizes instead. Each row then
carries ``context_bytes_per_step`` (the compiled step's exchanges over "context") and
``kv_exchange_bytes_per_step`` (the K/V gathers and gradient scatters by hand,
:func:`jtp.capacity.measure.kv_exchange_bytes`), charged at the link a context x tensor
group spans.

It needs one jax device per device of the cluster (forced CPU devices stand in for GPUs:
``JAX_NUM_CPU_DEVICES=64`` before jax starts; the program does that itself).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jtp.capacity.measure import (
    analytic_floor,
    compiled_attention,
    expert_floor,
    kv_exchange_bytes,
    measure,
)
from jtp.capacity.report import format_table
from jtp.capacity.roofline import Hardware, estimate
from jtp.errors import InputError
from jtp.models.hf import config_of
from jtp.models.llama import LlamaConfig
from jtp.models.stack import REMAT_POLICIES, remat_name
from jtp.recipes.llama import preset_config


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to lay a model out: mesh sizes, fsdp, sequence parallelism, a remat policy."""

    data: int
    tensor: int
    fsdp: bool
    sequence_parallel: bool
    remat: str  # a policy of jtp.models.stack ("none", "full", ...); True / False: full / none
    expert: int = 1  # the "expert" mesh axis (a MoE's experts split over it); 1: none
    context: int = 1  # the "context" mesh axis (each sequence split into pieces); 1: none

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", remat_name(self.remat))

    @property
    def devices(self) -> int:
        return self.data * self.expert * self.context * self.tensor

    def label(self) -> str:
        """``"DxT options"``; with an expert or context axis its size in mesh order
        (``"DxExT"``, ``"DxCxT"``, ``"DxExCxT"``); the table's header names the axes."""
        flags = [f for f in ("fsdp", "sequence_parallel") if getattr(self, f)]
        flags += [] if self.remat == "none" else [f"remat={self.remat}".replace("=full", "")]
        axes = (self.data, *(n for n in (self.expert, self.context) if n > 1), self.tensor)
        return (
            "x".join(map(str, axes))
            + " "
            + (",".join(f.replace("sequence_parallel", "sp") for f in flags) or "-")
        )


# The shortest piece of a sequence the search gives a device by itself: below it the step
# fits without a context axis (the default tables train 8,192 tokens whole per tensor
# group) and the K/V gathers only add traffic. --context tries any size.
CONTEXT_MIN_PIECE = 8192


def context_sizes(n_devices: int, seq: int, min_piece: int = CONTEXT_MIN_PIECE) -> list[int]:
    """The context sizes the search proposes for ``seq`` tokens on ``n_devices``: 1 and
    every power of two C dividing the devices with ``seq`` divisible by 2C (the balanced
    order's chunks, :func:`jtp.parallel.context.balanced_order`) and pieces ``seq / C`` of
    at least ``min_piece`` tokens."""
    out, c = [1], 2
    while c <= n_devices and n_devices % c == 0 and seq % (2 * c) == 0 and seq // c >= min_piece:
        out.append(c)
        c *= 2
    return out


def context_problem(c: int, seq: int) -> str | None:
    """Why a context size cannot split ``seq`` tokens (None when it can)."""
    if c > 1 and seq % (2 * c):
        return (
            f"sequence length {seq} is not divisible by 2 x context = {2 * c} (the balanced "
            "order cuts each sequence into two chunks per device)"
        )
    return None


def layouts(
    n_devices: int,
    per_host: int,
    n_heads: int,
    n_kv: int,
    batch: int,
    seq: int,
    remat: tuple[str, ...] = REMAT_POLICIES,
    n_experts: int = 0,
    contexts: tuple[int, ...] = (1,),
) -> list[Layout]:
    """Valid splits: tensor divides the query heads and divides the kv heads or is a
    multiple of them (each kv head then replicated, :func:`jtp.plans.replicate_kv`: the
    compiled step the planner sizes holds the copies), fits in one host; data divides the
    batch; each with every remat policy in ``remat``.

    A mixture of experts (``n_experts`` > 0) also gets every "expert" axis size X > 1 that
    divides ``n_experts`` with X x tensor inside one host (its all-to-alls want the fast
    links); data is the rest, and the batch is split data x X ways. A dense model gets
    none: its layouts are those of before.

    Each context size C in ``contexts`` (:func:`context_sizes`) that divides what tensor
    and expert leave, with ``seq`` divisible by 2C, gives layouts with a "context" axis:
    data is then devices / (X x C x tensor) (rows are not split over "context"), and
    sequence parallelism needs ``seq`` divisible by C x tensor. A context group may cross
    hosts (its K/V gathers are charged at the link it spans)."""
    out = []
    for t in range(1, min(per_host, n_devices) + 1):
        if n_devices % t or n_heads % t or (n_kv % t and t % n_kv):
            continue
        experts = [x for x in range(1, n_experts + 1) if n_experts % x == 0] if n_experts else [1]
        for x in experts:
            if x * t > per_host or n_devices % (x * t):
                continue
            for c in contexts:
                if n_devices % (x * c * t) or context_problem(c, seq):
                    continue
                d = n_devices // (x * c * t)
                if batch % (d * x):
                    continue
                ranks = d * x  # fsdp shards over the batch axes: over 1 device it is a no-op
                for fsdp in (False, True) if ranks > 1 else (False,):
                    for sp in (False, True) if t > 1 and seq % (c * t) == 0 else (False,):
                        for policy in remat:
                            out.append(Layout(d, t, fsdp, sp, policy, expert=x, context=c))
    return out


@dataclasses.dataclass(frozen=True)
class Request:
    """The question the planner answers: this model, this cluster, this batch.

    Attributes:
      model: a preset of jtp.models.llama.PRESETS (ignored when ``hf`` is given).
      hf: a Hugging Face directory whose config.json gives the shapes (no weight is read).
      devices: devices in the cluster.
      devices_per_host: devices per host: a tensor group stays inside one.
      global_batch: sequences per optimizer step.
      micro_batch: sequences per data rank per micro-step (the rest is accumulation).
      seq_len: tokens per sequence.
      precision: a jtp precision (``bf16-mixed``, ...).
      attention: the kernel to size; ``auto``: what the GPU runs (on CPU devices jtp's
        blockwise kernel stands for cuDNN's fused one).
      tensor: only these tensor sizes; None: every valid one.
      remat: the remat policies to try.
      expert: only these "expert" axis sizes (1: none); None: every valid one (a MoE
        model's; a dense model has only 1).
      context: only these "context" axis sizes (1: none); None: those
        :func:`context_sizes` proposes for ``seq_len`` (1 alone below 16,384 tokens).
    """

    model: str = "llama3-8b"
    hf: str | None = None
    devices: int = 64
    devices_per_host: int = 8
    global_batch: int = 256
    micro_batch: int = 1
    seq_len: int = 8192
    precision: str = "bf16-mixed"
    attention: str = "auto"
    tensor: tuple[int, ...] | None = None
    remat: tuple[str, ...] = REMAT_POLICIES
    expert: tuple[int, ...] | None = None
    context: tuple[int, ...] | None = None

    def model_config(self) -> LlamaConfig:
        """The model's shapes: ``hf``'s config.json, else the preset's."""
        if self.hf:
            return config_of(self.hf, max_seq_len=self.seq_len)
        return preset_config(self.model)

    def model_label(self) -> str:
        return f"{self.hf} ({self.model} ignored)" if self.hf else self.model


@dataclasses.dataclass(frozen=True)
class CapacityTable:
    """The answer: one row per layout (best first: those that fit, by estimated tokens/s),
    and the recommended row (None when nothing fits). :meth:`to_json` is what the program
    writes with ``--json``; :meth:`format` what it prints."""

    request: Request
    hardware: Hardware
    attention_compiled: str  # the kernel compiled (attention="auto" on CPU: see Request)
    rows: list[dict[str, Any]]
    recommended: dict[str, Any] | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        request = dataclasses.asdict(self.request)
        request["label"] = self.request.model_label()
        request["attention_compiled"] = self.attention_compiled
        moe = moe_summary(self.request.model_config())
        return {
            "request": request,
            **({"moe": moe} if moe else {}),
            "hardware": dataclasses.asdict(self.hardware),
            "usable_bytes_per_device": self.hardware.usable_bytes,
            "rows": self.rows,
            "recommended": self.recommended,
            "seconds": self.seconds,
        }

    def format(self) -> str:
        return format_table(self.to_json())


def moe_summary(model: LlamaConfig) -> dict[str, Any] | None:
    """A mixture of experts' parameter counts (None for a dense model): ``params`` (all),
    ``active_params`` (what one token's forward uses: k of E experts per sparse layer),
    ``expert_params`` (the stacked experts), ``n_experts``, ``experts_per_token``."""
    if not model.n_experts:
        return None
    return {
        "params": model.num_params(),
        "active_params": model.num_active_params(),
        "expert_params": model.num_expert_params(),
        "n_experts": model.n_experts,
        "experts_per_token": model.experts_per_token,
    }


def _chosen(request: Request, model: LlamaConfig) -> list[Layout]:
    """The layouts to size; ``request.tensor`` matching none is an error that says why."""
    r = request
    for c in r.context or ():
        problem = context_problem(c, r.seq_len) or (
            f"it does not divide --devices {r.devices}" if r.devices % c else None
        )
        if problem:  # say why, not "no configuration fits"
            raise InputError(f"--context {c}: {problem}")
    found = layouts(
        r.devices,
        r.devices_per_host,
        model.n_heads,
        model.n_kv_heads,
        r.global_batch,
        r.seq_len,
        tuple(remat_name(p) for p in r.remat),
        model.n_experts or 0,
        tuple(r.context) if r.context else tuple(context_sizes(r.devices, r.seq_len)),
    )
    if r.expert:
        found = [c for c in found if c.expert in r.expert]
    if not r.tensor:
        return found
    valid = sorted({c.tensor for c in found})
    if not set(r.tensor) & set(valid):  # say why, not "no configuration fits" as if memory were
        raise InputError(
            f"--tensor {','.join(map(str, r.tensor))}: no valid split of {r.devices} devices "
            f"for {model.n_heads} heads / {model.n_kv_heads} kv heads and batch "
            f"{r.global_batch} (the tensor size divides the heads, fits in --devices-per-host "
            f"{r.devices_per_host}); valid sizes: {valid}"
        )
    return [c for c in found if c.tensor in r.tensor]


def search(
    request: Request,
    hardware: Hardware | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    progress: Callable[[Layout, dict[str, float], float], None] | None = None,
) -> CapacityTable:
    """Size every valid layout of ``request`` and rank them.

    ``devices``: the stand-ins the steps compile for, at least ``request.devices`` of them
    (default ``jax.devices()``). ``progress(layout, measured, seconds)`` is called after each
    compile (the program prints a line to stderr).
    """
    hw = hardware or Hardware()
    r = request
    available = list(jax.devices() if devices is None else devices)
    if len(available) < r.devices:
        raise InputError(
            f"--devices {r.devices}: only {len(available)} {available[0].platform} devices; "
            f"on CPU, force them before jax starts: JAX_NUM_CPU_DEVICES={r.devices}"
        )
    available = available[: r.devices]
    model = r.model_config()
    platform = available[0].platform
    attention = compiled_attention(
        r.attention, r.precision, model.head_dim, platform, model.attn_softcap
    )
    t0 = time.perf_counter()
    rows = []
    for layout in _chosen(r, model):
        ranks = layout.data * layout.expert  # the batch's rows split over data x expert
        if r.global_batch % (ranks * r.micro_batch):
            continue
        accumulate = r.global_batch // (ranks * r.micro_batch)
        m = measure(
            layout,
            r.model,
            model.n_layers,
            r.seq_len,
            r.micro_batch,
            r.precision,
            available,
            accumulate,
            hf=r.hf,
            attention=r.attention,
        )
        est = estimate(m, layout, hw, r.devices_per_host)
        kv = kv_exchange_bytes(model, layout, r.seq_len, r.micro_batch, r.precision)
        rows.append(
            {
                "config": dataclasses.asdict(layout),
                "label": layout.label(),
                "accumulate": accumulate,
                "memory_bytes": m["memory"],
                "floor_bytes": analytic_floor(model, r.devices, layout, r.precision),
                "expert_floor_bytes": expert_floor(model, r.devices, layout, r.precision),
                "fits": m["memory"] <= hw.usable_bytes,
                "flops_per_step": m["flops"],
                "bf16_flops_per_step": m["flops_bf16"],
                "float8_flops_per_step": m["flops_float8"],
                "tensor_bytes_per_step": m["bytes_tensor"],
                "data_bytes_per_step": m["bytes_data"] + m["bytes_both"],
                **({"expert_bytes_per_step": m["bytes_expert"]} if model.n_experts else {}),
                **(
                    {
                        "context_bytes_per_step": m["bytes_context"],
                        "kv_exchange_bytes_per_step": kv * accumulate,
                    }
                    if layout.context > 1
                    else {}
                ),
                **est,
                "tokens_per_s_per_device": r.global_batch * r.seq_len / est["step_s"] / r.devices,
            }
        )
        if progress is not None:
            progress(layout, m, time.perf_counter() - t0)
    rows.sort(key=lambda row: (not row["fits"], -row["tokens_per_s_per_device"]))
    best = next((row for row in rows if row["fits"]), None)
    return CapacityTable(r, hw, attention, rows, best, time.perf_counter() - t0)
