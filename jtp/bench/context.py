"""``python -m jtp.bench context``: a long-sequence train step against the context size C:
memory per device, step time, the attention work each device does, and the longest sequence
a memory budget trains.

The model: the tiny Llama's widths (dim 128, SwiGLU 384, vocabulary 512) with 4 heads of 32
(2 kv heads), ``--layers`` blocks scanned (as jtp runs them by default); batch 1 x
``--seq-len`` tokens (4096: at 8192 XLA's one-device step takes ~40 s on two cores) in the
balanced order
(:func:`jtp.parallel.context.next_token_pieces`), float32, AdamW, the trainer's own step
(``jtp.training.compile``), on forced CPU devices, a context-only mesh of
C = 1, 2, 4, 8 devices (``--sizes``). Each attention (``--kernels``: XLA's kernel, which
masks a (T / C, T) score matrix per device, and the blockwise one, which skips the tiles no
pair of which attends, both after an all-gather of the keys and values; "blockwise ring":
the blockwise kernel on the ring strategy, blocks passed around the context group) gives a
row per C:

- peak memory per device (XLA's buffer analysis of the compiled step: arguments + outputs +
  temporaries - aliases), the bytes each device moves over "context" per step (from the
  compiled HLO: the K/V all-gathers, their reduce-scatters and the gradient all-reduces), and
  the step time (median of ``--repeats`` after a warm-up step) with the step's loss (the same
  for every C: the pieces are one sequence);
- the attention work per device with the blockwise kernel (:func:`jtp.parallel.context.
  attention_work`): max / min over the devices in the balanced order and in a plain split;
- the longest sequence (a power of two from ``--search-from`` up to ``--max-seq-len``) whose
  step fits ``--budget-mib`` per device, compiled on shapes only (nothing runs).

On CPU the C devices of a mesh share the machine's cores, so the step time measures the total
work (and its balance only indirectly), not what C GPUs would take.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

from jtp.bench.results import machine, write_result

MIB = 2**20
HEADS, KV_HEADS = 4, 2  # head dim 32 at width 128 (see the module docstring)


def context(args: argparse.Namespace) -> dict[str, Any]:
    from jtp.mesh import select_devices
    from jtp.parallel.context import attention_tiles, attention_work

    sizes = [int(s) for s in str(args.sizes).split(",")]
    kernels = [k.strip() for k in str(args.kernels).split(",")]
    devices = select_devices(max(sizes))
    load = [os.getloadavg()[0]]
    peaks: dict[tuple[str, int, int], float] = {}  # (kernel, C, T) -> MiB per device
    rows = []
    for kernel in kernels:
        for c in sizes:
            rows.append(_measure(args, kernel, c, devices))
            peaks[(kernel, c, args.seq_len)] = rows[-1]["peak_mib"]
            print(
                f"  {kernel}, context {c}: {rows[-1]['step_seconds']:.2f} s, "
                f"{rows[-1]['peak_mib']:.0f} MiB",
                file=sys.stderr,
            )
    config = model_config(args.layers, args.seq_len, "xla")
    balance = []
    for c in sizes:
        entry: dict[str, Any] = {"context": c}
        for order in ("balanced", "plain"):
            work = attention_work(
                args.seq_len, c, order=order, heads=config.n_heads, head_dim=config.head_dim
            )
            entry[order] = float(work.max() / work.min())
            entry[f"tiles_{order}"] = attention_tiles(args.seq_len, c, order=order).tolist()
        balance.append(entry)
    longest = [_longest(args, kernel, c, devices, peaks) for kernel in kernels for c in sizes]
    load.append(os.getloadavg()[0])
    payload = {
        "benchmark": "context",
        "machine": machine(),
        "platform": devices[0].platform,
        "model": dataclasses.asdict(config) | {"attention": None},
        "batch_size": 1,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "budget_mib": args.budget_mib,
        "max_seq_len": args.max_seq_len,
        # 1-minute load average before and after: others' work on a shared machine shows here
        "load_average": load,
        "rows": rows,
        "balance": balance,
        "longest": longest,
    }
    print(format_context(payload))
    write_result(args, payload)
    return payload


def model_config(layers: int, seq_len: int, attention: str):
    """The bench's model; ``attention``: a kernel ("xla", "blockwise") with the all-gather
    strategy, or ``"KERNEL ring"`` for the ring (:mod:`jtp.models.ring`)."""
    from jtp.models.llama import PRESETS

    kernel, _, strategy = attention.partition(" ")
    return dataclasses.replace(
        PRESETS["tiny"],
        n_layers=layers,
        n_heads=HEADS,
        n_kv_heads=KV_HEADS,
        max_seq_len=seq_len,
        attention=kernel,
        context_attention=strategy or "all-gather",
    )


def _task(config):
    """A TrainModule training ``config``'s Llama on next-token pieces with AdamW."""
    import optax
    from flax import nnx

    from jtp.models.llama import Llama
    from jtp.models.plans import llama
    from jtp.recipes.objective import next_token_loss
    from jtp.training.module import TrainModule

    class NextToken(TrainModule):
        def configure_model(self, mesh):
            return (lambda: Llama(config, rngs=nnx.Rngs(0))), llama(config, mesh=mesh)

        def training_step(self, model, batch):
            return next_token_loss(model, batch)

        def configure_optimizers(self):
            return optax.adamw(1e-3)

    return NextToken()


def _strategy(c: int, devices: list):
    from jtp.mesh import ModelParallelStrategy

    return ModelParallelStrategy(1, 1, context_parallel_size=c, devices=devices[:c])


def _measure(args: argparse.Namespace, kernel: str, c: int, devices: list) -> dict[str, Any]:
    import jax
    import numpy as np

    from jtp.analysis.collectives import bytes_by_axes, collectives
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.parallel.batch import shard_batch
    from jtp.parallel.context import next_token_pieces
    from jtp.training.compile import build_state, compile_train_step, train_step
    from jtp.training.options import TrainerOptions

    config = model_config(args.layers, args.seq_len, kernel)
    task, strategy, options = _task(config), _strategy(c, devices), TrainerOptions()
    state, rules = build_state(task, strategy, options)
    step = train_step(task, state, options, fsdp=False)
    tokens = np.random.default_rng(0).integers(
        0, config.vocab_size, (1, args.seq_len + 1), dtype=np.int32
    )
    pieces = next_token_pieces(tokens, c)
    pieces["positions"] = np.broadcast_to(pieces["positions"], pieces["inputs"].shape)
    batches = [shard_batch(pieces, strategy.mesh)]
    start = time.perf_counter()
    compiled = compile_train_step(step, state, batches, rules)
    compile_s = time.perf_counter() - start
    arrays, times, loss = state.arrays(), [], None
    for i in range(args.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        *arrays, metrics = compiled(*arrays, batches)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - start)
        else:
            loss = float(metrics["loss"])  # before any update: the same for every C
    moved = bytes_by_axes([r for r in collectives(compiled, strategy.mesh) if r.axes])
    return {
        "attention": kernel,
        "context": c,
        "peak_mib": peak_memory_per_device(compiled) / MIB,
        "context_mib": moved.get("context", 0) / MIB,
        "step_seconds": statistics.median(times),
        "steps_seconds": times,
        "compile_seconds": compile_s,
        "loss": loss,
    }


def _peak_mib(args: argparse.Namespace, kernel: str, c: int, seq_len: int, devices: list):
    """Per-device MiB of the step at ``seq_len``, compiled on shapes alone."""
    import jax
    import numpy as np

    from jtp.analysis.memory import peak_memory_per_device
    from jtp.training.compile import abstract_train_step

    config = model_config(args.layers, seq_len, kernel)
    task, strategy = _task(config), _strategy(c, devices)
    factory, plan = task.configure_model(strategy.mesh)
    batch = {
        k: jax.ShapeDtypeStruct((1, seq_len), np.int32) for k in ("inputs", "labels", "positions")
    }
    compiled = abstract_train_step(task, strategy, batch, factory=factory, plan=plan)
    return peak_memory_per_device(compiled) / MIB


def _longest(
    args: argparse.Namespace,
    kernel: str,
    c: int,
    devices: list,
    peaks: dict[tuple[str, int, int], float],
) -> dict[str, Any]:
    """The longest sequence ``search_from * 2^k`` (at most ``max_seq_len``) whose step fits
    the budget per device. A larger C never needs more per device at the same length, so
    the search starts at the longest one a smaller C fitted (``peaks``: the MiB per device
    measured so far, by (kernel, C, length); it gains this search's)."""

    def searched(t: int) -> bool:
        q, r = divmod(t, args.search_from)
        return r == 0 and q & (q - 1) == 0

    fitted = [
        t
        for (k, smaller, t), mib in peaks.items()
        if k == kernel and smaller < c and mib <= args.budget_mib and searched(t)
    ]
    best = None
    for start in dict.fromkeys([max(fitted, default=args.search_from), args.search_from]):
        t = start
        while t <= args.max_seq_len:
            if (kernel, c, t) not in peaks:
                peaks[(kernel, c, t)] = _peak_mib(args, kernel, c, t, devices)
            if peaks[(kernel, c, t)] > args.budget_mib:
                break
            best, t = t, 2 * t
        if best is not None:
            break
    print(f"  {kernel}, context {c}: longest {best} tokens", file=sys.stderr)
    peak = peaks[(kernel, c, best)] if best is not None else None
    return {"attention": kernel, "context": c, "seq_len": best, "peak_mib": peak}


def format_context(p: dict[str, Any]) -> str:
    m = p["model"]
    load = " -> ".join(f"{x:.1f}" for x in p.get("load_average", []))
    lines = [
        f"Llama, {m['n_layers']} blocks of width {m['dim']}, {m['n_heads']} heads of "
        f"{m['dim'] // m['n_heads']} ({m['n_kv_heads']} kv), vocabulary {m['vocab_size']}; "
        f"batch 1 x {p['seq_len']} tokens in the balanced order, float32, AdamW; a "
        f"context-only mesh of C {p['platform']} devices; step: median of {p['repeats']}"
        + (f"; 1-minute load average {load}." if load else "."),
        "| attention | C | peak / device | vs C = 1 | moved over context / device | step | loss |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    one = {r["attention"]: r["peak_mib"] for r in p["rows"] if r["context"] == 1}
    for r in p["rows"]:
        ratio = f"{r['peak_mib'] / one[r['attention']]:.2f}" if r["attention"] in one else "-"
        lines.append(
            f"| {r['attention']} | {r['context']} | {r['peak_mib']:.1f} MiB | {ratio} | "
            f"{r['context_mib']:.1f} MiB | {r['step_seconds']:.2f} s | {r['loss']:.4f} |"
        )
    lines += [
        "",
        f"Attention work per device at {p['seq_len']} tokens, blockwise kernel (tiles of "
        "512 computed), max / min over the C devices:",
        "| C | balanced order | plain split | tiles per device, balanced | plain |",
        "|--:|--:|--:|---|---|",
    ]
    for b in p["balance"]:
        lines.append(
            f"| {b['context']} | {b['balanced']:.2f} | {b['plain']:.2f} | "
            f"{_tiles(b['tiles_balanced'])} | {_tiles(b['tiles_plain'])} |"
        )
    lines += [
        "",
        f"Longest sequence (a power of two, at most {p['max_seq_len']}) whose step fits "
        f"{p['budget_mib']} MiB per device (compiled, not run):",
        "| attention | C | tokens | peak / device |",
        "|---|--:|--:|--:|",
    ]
    for r in p["longest"]:
        tokens = f"{r['seq_len']:,}" if r["seq_len"] else "none"
        peak = f"{r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "-"
        capped = " (the cap)" if r["seq_len"] == p["max_seq_len"] else ""
        lines.append(f"| {r['attention']} | {r['context']} | {tokens}{capped} | {peak} |")
    return "\n".join(lines)


def _tiles(tiles: list[int]) -> str:
    return " ".join(str(t) for t in tiles)
