"""``python -m jtp.bench attention``: each attention kernel on real models' shapes, forward +
backward in bf16, against float32, and which kernel "auto" takes.

The cases (:data:`jtp.bench.gpu_checks.ATTENTION_CASES`) are Llama-3-8B's causal
grouped-query attention and Gemma's: a sliding layer's window with the layer's kind traced
(as one scanned block of sliding and global layers runs it: ``jax.lax.cond`` between two
static-window kernels, so cuDNN's fused kernel stays usable), Gemma 2's soft-capped scores
(no fused kernel computes them: "auto" must take XLA's) and Gemma 3's window and score
scale. On a GPU: cuDNN (or "auto"), XLA and jtp's blockwise kernel; elsewhere XLA and
blockwise. ``--smoke``: tiny shapes, for the code path on CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from jtp.bench.results import machine, write_result


def attention(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from jtp.bench.gpu_checks import (
        ATTENTION_CASES,
        ATTENTION_RTOL,
        SMOKE_ATTENTION_CASES,
        attention_check,
        gemma_model_check,
    )

    device = jax.devices()[0]
    cases = SMOKE_ATTENTION_CASES if args.smoke else ATTENTION_CASES
    rows = []
    for name, case in cases.items():
        for row in attention_check(case, device.platform):
            rows.append({"case": name, "shape": case, **row})
    payload = {
        "benchmark": "attention",
        "machine": machine(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "smoke": bool(args.smoke),
        "tolerance": ATTENTION_RTOL,
        "rows": rows,
        "gemma_model": gemma_model_check(device.platform, smoke=args.smoke),
    }
    print(format_attention(payload))
    write_result(args, payload)
    return payload


def format_attention(r: dict[str, Any]) -> str:
    """The Markdown table of ``r`` (docs/performance.md renders it)."""
    lines = [
        f"{r['device_kind']} ({r['platform']}){' SMOKE: tiny shapes' if r['smoke'] else ''}; "
        f"bf16 forward + backward against float32, tolerance {r['tolerance']}",
        "",
        "| case | kernel | layer | max rel. error (out, dq, dk, dv) | within tol. "
        "| fused kernel | ms |",
        "|---|---|---|---|---|---|---:|",
    ]
    for a in r["rows"]:
        err = ", ".join(f"{v:.1e}" for v in a["relative_error"].values())
        lines.append(
            f"| {a['case']} | {a['implementation']} | {a['layer'] or '-'} | {err} | "
            f"{a['within_tolerance']} | {a['fused_kernel_in_program']} | "
            f"{a['forward_backward_ms']:.2f} |"
        )
    m = r["gemma_model"]
    err = ", ".join(f"{k} {v:.1e}" for k, v in m["relative_error"].items())
    lines.append(
        f"\nGemma-3-style model, {m['config']['n_layers']} layers (5 sliding : 1 global, "
        f"window {m['config']['sliding_window']}), {m['tokens']} tokens, scanned, remat dots, "
        f"bf16 'auto' vs float32 XLA: {err} (tolerance {m['tolerance']}); cuDNN kernel in the "
        f"program: {m['fused_kernel_in_program']}; conditional: {m['conditional_in_program']}; "
        f"{m['forward_backward_ms']:.1f} ms forward + backward"
    )
    return "\n".join(lines)
