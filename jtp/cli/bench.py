"""``python -m jtp.bench``: the figures README quotes, re-measured, as a table and JSON.

    python -m jtp.bench memory   [--dim 8192] [--json PATH] [--plot PNG]
    python -m jtp.bench overhead [--dim 1024] [--steps 200] [--json PATH]
    python -m jtp.bench llama    [--json PATH] [--no-8b]

``memory`` re-runs the Lightning docs' table: FeedForward(dim, dim) + AdamW, global batch 8,
with tensor parallelism over 1, 2, 4, 8 devices and 2D (data 2 x tensor 4, fsdp). Each
configuration is a real ``python -m jtp.train`` run in its own process (forced CPU devices
on a CPU machine), and its per-device peak is the one the trainer reports. Beside it:
Lightning's published CUDA figures and the floor, (params + grads + 2 AdamW moments) / N.

``overhead`` times ``Trainer.fit`` against a bare jitted loop with the same shardings, the
same compiled step and the same loader, in one process, alternating runs; the ratio of
steady-state steps/s is the trainer's cost.

``llama`` compiles the trainer's real Llama train step abstractly (:mod:`jtp.analysis.abstract`:
nothing allocated) on 64 forced CPU devices and reads per-device memory and collective bytes
per step: the tiny preset at (1,8), (2,4), (8,1) with and without fsdp / sequence parallel /
remat, and llama3-8b at data 8 x tensor 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

GB = 1e9
LIGHTNING_GB = {1: 4.04, 2: 2.03, 4: 1.02, 8: 0.60}  # docs table, CUDA, 8192x8192, AdamW
MEMORY_CONFIGS = [  # (data, tensor, fsdp)
    (1, 1, False),
    (1, 2, False),
    (1, 4, False),
    (1, 8, False),
    (2, 4, True),
]


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {path}")


def _train_run(data: int, tensor: int, fsdp: bool, dim: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.json")
        cmd = [
            sys.executable, "-m", "jtp.train", "--devices", str(data * tensor),
            "--data-parallel", str(data), "--tensor-parallel", str(tensor),
            "--dim", str(dim), "--hidden-dim", str(dim), "--max-steps", str(steps),
            "--no-progress", "--root-dir", tmp, "--metrics-json", out,
        ]  # fmt: skip
        if fsdp:
            cmd.append("--fsdp")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        with open(out) as f:
            return json.load(f)


def memory(args: argparse.Namespace) -> dict[str, Any]:
    state_bytes = 4 * 3 * args.dim * args.dim * 4  # (params + grads + mu + nu) x 3 kernels, fp32
    rows = []
    for data, tensor, fsdp in MEMORY_CONFIGS:
        t0 = time.perf_counter()
        run = _train_run(data, tensor, fsdp, args.dim, args.steps)
        shards = data * tensor if fsdp else tensor
        floor = state_bytes / shards
        peak = run["peak_memory_bytes_per_device"]
        lightning = LIGHTNING_GB.get(data * tensor) if not fsdp and data == 1 else None
        # FSDP gathers each kernel's tensor shard over "data" for the step: on this one-layer
        # model that is the whole layer's tensor shard, held transiently beside the state.
        gathered = 3 * args.dim * args.dim * 4 / tensor if fsdp else 0
        rows.append(
            {
                "config": f"2D fsdp {data}x{tensor}" if fsdp else f"TP={tensor}",
                "devices": data * tensor,
                "mesh": run["mesh"],
                "fsdp": fsdp,
                "platform": run["platform"],
                "peak_bytes_per_device": peak,
                "floor_bytes_per_device": floor,
                "ratio_to_floor": peak / floor,
                "gathered_bytes_per_device": gathered,
                "ratio_to_floor_plus_gathered": peak / (floor + gathered),
                "lightning_gb": lightning if args.dim == 8192 else None,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  measured {rows[-1]['config']}: {peak / GB:.3f} GB", file=sys.stderr)
    print(format_memory(rows, args.dim))
    payload = {"benchmark": "memory", "dim": args.dim, "machine": _machine(), "rows": rows}
    _write_json(args.json, payload)
    if args.plot:
        _plot(rows, args.plot, f"FeedForward {args.dim}x{args.dim} + AdamW")
    return payload


def format_memory(rows: list[dict[str, Any]], dim: int) -> str:
    head = (
        f"FeedForward({dim}, {dim}) + AdamW, batch 8: peak memory per device "
        f"({rows[0]['platform']}; compiled-step analysis where the backend keeps no stats)\n"
    )
    lines = [
        f"| {'config':<15} | {'devices':>7} | {'jtp GB':>7} | {'floor GB':>8} | "
        f"{'jtp/floor':>9} | {'Lightning GB':>12} | {'jtp/Lightning':>13} |",
        f"|{'-' * 17}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 14}|{'-' * 15}|",
    ]
    for r in rows:
        lt = r["lightning_gb"]
        peak_gb = r["peak_bytes_per_device"] / GB
        lines.append(
            f"| {r['config']:<15} | {r['devices']:>7} | {peak_gb:>7.3f} | "
            f"{r['floor_bytes_per_device'] / GB:>8.3f} | {r['ratio_to_floor']:>9.3f} | "
            f"{(f'{lt:.2f}' if lt else '-'):>12} | {(f'{peak_gb / lt:.2f}' if lt else '-'):>13} |"
        )
    notes = [
        f"{r['config']}: floor + the FSDP-gathered layer "
        f"({r['gathered_bytes_per_device'] / GB:.3f} GB) = "
        f"{(r['floor_bytes_per_device'] + r['gathered_bytes_per_device']) / GB:.3f} GB; "
        f"jtp / that = {r['ratio_to_floor_plus_gathered']:.3f}"
        for r in rows
        if r["fsdp"]
    ]
    return head + "\n".join(lines + notes)


def _plot(rows: list[dict[str, Any]], path: str, title: str = "FeedForward + AdamW") -> None:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
        return
    tp = [r for r in rows if not r["fsdp"]]
    n = [r["devices"] for r in tp]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, [r["peak_bytes_per_device"] / GB for r in tp], "o-", label="jtp (measured)")
    ax.plot(n, [r["floor_bytes_per_device"] / GB for r in tp], "k--", label="floor: state / N")
    lt = [(r["devices"], r["lightning_gb"]) for r in tp if r["lightning_gb"]]
    if lt:
        ax.plot(*zip(*lt, strict=True), "s-", label="Lightning (published, CUDA)")
    ax.set(xscale="log", xlabel="tensor-parallel devices", ylabel="peak GB per device")
    ax.set_xticks(n, [str(v) for v in n])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{title}: jtp on {tp[0]['platform'].upper()} (forced devices)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from jtp.cli.devices import select_devices

    select_devices(8)  # 8 forced devices on CPU (before jax starts); the first 8 elsewhere

    import jtp
    from jtp.cli.recipes import FeedForwardConfig, FeedForwardTask

    config = FeedForwardConfig(
        dim=args.dim, hidden_dim=4 * args.dim, samples=8 * args.steps, batch_size=8
    )
    strategy = jtp.ModelParallelStrategy(2, 4)

    def trainer_run() -> float:
        trainer = jtp.Trainer(
            strategy, max_epochs=1, enable_progress_bar=False, report_memory=False, logger="csv",
            default_root_dir=tempfile.mkdtemp(), log_every_n_steps=50,
        )  # fmt: skip
        trainer.fit(FeedForwardTask(config))
        return trainer.steps_per_second

    def bare_run() -> float:
        """The same step, shardings and loader, driven by a plain Python loop."""
        task = FeedForwardTask(config)
        trainer = jtp.Trainer(strategy, report_memory=False, logger=None)
        step = trainer.train_step_fn(task)
        state = trainer._state
        params, opt, rest = state.arrays()
        compiled = None
        n = 0
        for batch in task.train_dataloader():
            if compiled is None:
                compiled = trainer.compile_train_step(step, [batch])
                t0 = time.perf_counter()
            params, opt, rest, metrics = compiled(params, opt, rest, [batch])
            n += 1
        jax.block_until_ready(metrics)
        return n / (time.perf_counter() - t0)

    def replica_check_ms() -> float:
        """Cost of one jtp.check_replicas call on a training batch (hash every shard)."""
        task = FeedForwardTask(config)
        task.mesh = strategy.mesh
        batch = next(iter(task.train_dataloader()))
        jtp.check_replicas(batch)
        t0 = time.perf_counter()
        for _ in range(20):
            jtp.check_replicas(batch)
        return (time.perf_counter() - t0) / 20 * 1e3

    results: dict[str, list[float]] = {"trainer": [], "bare": []}
    for _ in range(args.repeats):
        results["bare"].append(bare_run())
        results["trainer"].append(trainer_run())
    best = {k: max(v) for k, v in results.items()}
    ratio = best["trainer"] / best["bare"]
    check_ms = replica_check_ms()
    table = "\n".join(
        [
            f"FeedForward({args.dim}, {4 * args.dim}), mesh data 2 x tensor 4, batch 8, "
            f"{args.steps} steps, best of {args.repeats} ({jax.devices()[0].platform})",
            f"| {'loop':<20} | {'steps/s':>9} |",
            f"|{'-' * 22}|{'-' * 11}|",
            f"| {'bare jitted loop':<20} | {best['bare']:>9.1f} |",
            f"| {'jtp.Trainer.fit':<20} | {best['trainer']:>9.1f} |",
            f"| {'ratio (target>=0.97)':<20} | {ratio:>9.3f} |",
            f"check_replicas on one batch: {check_ms:.2f} ms "
            f"({check_ms / (1e3 / best['bare']):.2f} steps' time; on by default for the first "
            "2 steps of a multi-process run)",
        ]
    )
    print(table)
    payload = {
        "benchmark": "overhead",
        "machine": _machine(),
        "dim": args.dim,
        "steps": args.steps,
        "runs": results,
        "best_steps_per_second": best,
        "ratio": ratio,
        "check_replicas_ms_per_batch": check_ms,
    }
    _write_json(args.json, payload)
    return payload


def _llama_row(
    preset: str, shape: tuple[int, int], seq_len: int, batch: int, devices: list, **flags: Any
) -> dict[str, Any]:
    import dataclasses

    from jtp.analysis.collectives import collectives
    from jtp.analysis.memory import peak_memory_per_device
    from jtp.cli.recipes import LlamaTaskConfig, abstract_llama_step

    precision = flags.pop("precision", "32-true")
    config = LlamaTaskConfig(preset=preset, seq_len=seq_len, batch_size=batch, **flags)
    t0 = time.perf_counter()
    compiled, mesh = abstract_llama_step(config, shape, devices, precision=precision)
    seconds = time.perf_counter() - t0
    colls = collectives(compiled, mesh)
    by_axis: dict[str, int] = {}
    for c in colls:
        key = "+".join(c.axes or ()) or "-"
        by_axis[key] = by_axis.get(key, 0) + c.bytes
    flags_on = [k for k, v in dataclasses.asdict(config).items() if v is True]
    return {
        "preset": preset,
        "mesh": {"data": shape[0], "tensor": shape[1]},
        "flags": flags_on + ([precision] if precision != "32-true" else []),
        "seq_len": seq_len,
        "global_batch": batch,
        "peak_bytes_per_device": peak_memory_per_device(compiled),
        "collective_bytes_by_axis": by_axis,
        "collectives": len(colls),
        "compile_seconds": seconds,
    }


def format_llama(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| {'preset':<10} | {'mesh d x t':>10} | {'options':<52} | {'peak/device':>12} | "
        f"{'tensor-axis bytes':>17} | {'data-axis bytes':>15} | {'other':>9} |",
        f"|{'-' * 12}|{'-' * 12}|{'-' * 54}|{'-' * 14}|{'-' * 19}|{'-' * 17}|{'-' * 11}|",
    ]
    for r in rows:
        ax = dict(r["collective_bytes_by_axis"])
        tensor, data = ax.pop("tensor", 0), ax.pop("data", 0)
        mesh = f"{r['mesh']['data']} x {r['mesh']['tensor']}"
        lines.append(
            f"| {r['preset']:<10} | {mesh:>10} | {', '.join(r['flags']) or 'plan only':<52} | "
            f"{_human(r['peak_bytes_per_device']):>12} | {_human(tensor):>17} | "
            f"{_human(data):>15} | {_human(sum(ax.values())):>9} |"
        )
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def llama(args: argparse.Namespace) -> dict[str, Any]:
    from jtp.cli.devices import select_devices

    devices = select_devices(64)
    rows = []
    variants = [
        {},
        {"fsdp": True},
        {"sequence_parallel": True},
        {"remat": True},
        {"fsdp": True, "sequence_parallel": True, "remat": True},
    ]
    for shape in [(1, 8), (2, 4), (8, 1)]:
        for flags in variants:
            if flags.get("sequence_parallel") and shape[1] == 1:
                continue
            rows.append(_llama_row("tiny", shape, 32, 8, devices, **flags))
            print(f"  tiny {shape} {flags}", file=sys.stderr)
    if not args.no_8b:
        big = {"fsdp": True, "precision": "bf16-mixed", "loss_parallel": True}
        for extra in ({"remat": True}, {"remat": True, "sequence_parallel": True}, {}):
            rows.append(_llama_row("llama3-8b", (8, 8), 8192, 8, devices, **big, **extra))
            print(f"  llama3-8b {extra}: {rows[-1]['compile_seconds']:.0f} s", file=sys.stderr)
    table = (
        "Llama train step (AdamW), per device, from the compiled program (abstract: nothing "
        f"allocated; {jax_platform()} backend, 64 forced devices). tiny: batch 8 x 32 tokens; "
        "llama3-8b: batch 8 x 8192 tokens.\n" + format_llama(rows)
    )
    print(table)
    payload = {"benchmark": "llama", "machine": _machine(), "rows": rows}
    _write_json(args.json, payload)
    return payload


def jax_platform() -> str:
    import jax

    return jax.devices()[0].platform


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m jtp.bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    m = sub.add_parser("memory", help="peak memory per device vs Lightning and the floor")
    m.add_argument("--dim", type=int, default=8192, help="FeedForward dim = hidden dim")
    m.add_argument("--steps", type=int, default=2, help="train steps per configuration")
    m.add_argument("--json", default="bench_results/memory.json", help="JSON output path")
    m.add_argument("--plot", default=None, help="PNG output path (needs matplotlib)")
    o = sub.add_parser("overhead", help="Trainer.fit steps/s vs a bare jitted loop")
    o.add_argument("--dim", type=int, default=512, help="FeedForward dim (hidden = 4 x dim)")
    o.add_argument("--steps", type=int, default=200, help="steps per run")
    o.add_argument("--repeats", type=int, default=3, help="alternating runs; best counts")
    o.add_argument("--json", default="bench_results/overhead.json", help="JSON output path")
    lm = sub.add_parser("llama", help="Llama memory and communication per step, abstractly")
    lm.add_argument("--json", default="bench_results/llama.json", help="JSON output path")
    lm.add_argument("--no-8b", action="store_true", help="skip the llama3-8b rows")
    args = p.parse_args(argv)
    return {"memory": memory, "overhead": overhead, "llama": llama}[args.which](args)


def run() -> None:
    """The ``python -m`` entry point."""
    main(sys.argv[1:])
