"""``python -m jtp.bench fp8``: float8 matmuls ("transformer-engine") against "bf16-mixed".

Numerics: ``python -m jtp.bench text``'s run (a tiny Llama learning the standard library's
``*.py`` byte-level, batch 32 x 128, 300 steps, 2x4 mesh of forced CPU devices) once per
precision, same data, order and seed, each a real ``python -m jtp.train`` process. The CPU
has no float8 arithmetic: it runs a float8 dot by converting the operands up, so the losses
are float8's (the operands are rounded to e4m3 / e5m2 exactly as a GPU rounds them) but the
times mean nothing.

The band (:data:`BAND_NATS`): the mean training loss over the last 50 steps and the final
validation loss of the fp8 run within 0.05 nats/byte of bf16-mixed's (2.5% of the ~2.0
reached). Why that wide: each float8 operand carries a relative rounding error up to 2^-4
(e4m3) or 2^-3 (e5m2 gradients), 16-32 times bf16's, and at width 128 a matmul sums only
128-384 products, so less of it averages out than at a real model's width; published fp8
runs (torchtitan's Llama-3 8B, NVIDIA's Llama-2) end within ~1% of bf16's loss. Why that
narrow: a wrong scale, a saturating cast or a broken gradient shows as a loss that stalls
or diverges, tenths of a nat away within the first hundred steps.

Program: the float8 share of the matmul FLOPs, read off the traced train step
(:mod:`jtp.analysis.dtypes`), for the tiny model trained here and for Llama-3-8B's shapes
(abstract arrays: nothing is allocated) at T = 2048 and 8192, and which matmuls are not
float8 (attention's scores and values, as under "bf16-mixed").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import warnings
from collections import Counter
from typing import Any

from jtp.bench.results import machine, write_result
from jtp.bench.text import _commands

BAND_NATS = 0.05  # |fp8 - bf16| of the last-50-step mean loss and of the final val loss
TAIL = 50  # steps averaged at the end of the run
PRECISION = "transformer-engine"  # the float8 policy whose programs are read
PROGRAMS = (("tiny", 128, 32), ("llama3-8b", 2048, 1), ("llama3-8b", 8192, 1))


def fp8(args: argparse.Namespace) -> dict[str, Any]:
    precisions = args.precisions.split(",")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare, train = _commands(args, tmp)
        subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL, timeout=600)
        for name in precisions:
            out = os.path.join(tmp, f"{name}.json")
            command = [*train, "--precision", name, "--metrics-json", out]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=1800)
            with open(out) as f:
                run = json.load(f)
            runs[name] = {k: run[k] for k in ("losses", "val_history", "val_loss", "fit_seconds")}
        platform, mesh = run["platform"], run["mesh"]
    payload = {
        "benchmark": "fp8",
        "machine": machine(),
        "platform": platform,
        "mesh": mesh,
        "steps": args.steps,
        "band_nats": BAND_NATS,
        "tail_steps": TAIL,
        "runs": runs,
        "programs": [program_shares(*p) for p in PROGRAMS],
    }
    print(format_fp8(payload))
    write_result(args, payload)
    return payload


def program_shares(preset: str, seq_len: int, batch: int) -> dict[str, Any]:
    """Matmul FLOPs by operand dtype of the :data:`PRECISION` train step of ``preset``
    at ``seq_len`` (XLA attention, scanned layers counted per trip), traced on abstract
    arrays on one device, and the float8 share; also what attention's matmuls come to."""
    import jax

    from jtp.analysis.dtypes import dot_flops_by_dtype, dots, float8_fraction, is_float8
    from jtp.recipes.config import LlamaTaskConfig
    from jtp.recipes.llama import trace_llama_step

    config = LlamaTaskConfig(
        preset=preset, seq_len=seq_len, batch_size=batch, attention="xla", remat="dots"
    )
    with warnings.catch_warnings():  # T = 8192's attention: the share below says it
        warnings.simplefilter("ignore", UserWarning)
        traced, _ = trace_llama_step(config, (1, 1), jax.devices()[:1], precision=PRECISION)
    totals = dot_flops_by_dtype(traced.jaxpr)
    other = Counter()
    for d in dots(traced.jaxpr):
        if not is_float8(d.dtype):
            other[d.where.split(" ")[-1].strip("()") or "?"] += d.flops
    total = sum(totals.values())
    return {
        "preset": preset,
        "seq_len": seq_len,
        "batch": batch,
        "flops_by_dtype": totals,
        "float8_share": float8_fraction(traced.jaxpr),
        "not_float8_by_function": {k: v / total for k, v in other.items()},
    }


def _tail_mean(losses: list[float], n: int) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail)


def format_fp8(p: dict[str, Any]) -> str:
    runs = p["runs"]
    names = list(runs)
    base, rest = names[0], names[1:]
    head = (
        f"tiny Llama, byte-level stdlib *.py (as bench text), mesh {p['mesh']['data']}x"
        f"{p['mesh']['tensor']} {p['platform']}, batch 32 x 128, {p['steps']} steps, "
        f"per precision\n"
    )
    cols = " | ".join(f"{n} train | {n} val" for n in names)
    lines = [f"| step | {cols} |", "|-----:|" + "-----:|" * (2 * len(names))]
    for i, v in enumerate(runs[base]["val_history"]):
        s = v["step"]
        cells = []
        for n in names:
            window = runs[n]["losses"][max(0, s - 10) : s]
            val = runs[n]["val_history"][i]["val_loss"]
            cells.append(f"{sum(window) / len(window):.3f} | {val:.3f}")
        lines.append(f"| {s} | {' | '.join(cells)} |")
    tail = ["(train: mean of the 10 steps before; val: nats/byte on the held-out bytes)"]
    n, band = p["tail_steps"], p["band_nats"]
    for name in rest:
        d_tail = _tail_mean(runs[name]["losses"], n) - _tail_mean(runs[base]["losses"], n)
        d_val = runs[name]["val_loss"] - runs[base]["val_loss"]
        ok = abs(d_tail) <= band and abs(d_val) <= band
        tail.append(
            f"{name} - {base}: last-{n}-step mean train loss {d_tail:+.4f}, final val "
            f"{d_val:+.4f} nats/byte: {'within' if ok else 'OUTSIDE'} the band +-{band}"
        )
    tail.append(
        "fit seconds: "
        + ", ".join(f"{k} {v['fit_seconds']:.0f}" for k, v in runs.items())
        + " (CPU: float8 dots run upcast, so these times say nothing of a GPU's)"
    )
    for prog in p["programs"]:
        others = ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in sorted(prog["not_float8_by_function"].items())
        )
        tail.append(
            f"{prog['preset']} T={prog['seq_len']}: {100 * prog['float8_share']:.1f}% of the "
            f"train step's matmul FLOPs in float8; not float8: {others or 'none'}"
        )
    return head + "\n".join(lines) + "\n" + "\n".join(tail)
