"""``python -m jtp.bench text``: a tiny Llama that visibly learns, timed end to end.

The Python standard library's own ``*.py`` files (on every machine) prepared byte-level by
``python -m jtp.prepare``, then ``python -m jtp.train --model llama --data DIR`` on a 2x4
mesh of forced CPU devices: batch 32 x 128 bytes, AdamW with warmup + cosine at 3e-3,
validation every ``--val-every`` steps on the held-out tail of every file. Both commands are
real processes, as a user runs them; the wall time counted is the training command's
(start-up, compile, steps and validations). Writes the loss curves as JSON and a PNG.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any

from jtp.bench.results import machine, write_result

TARGET_NATS = 2.0  # the bar: validation <= 2.0 nats/byte after 300 steps


def _commands(args: argparse.Namespace, tmp: str) -> tuple[list[str], list[str]]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = os.path.join(tmp, "data")
    prepare = [
        sys.executable,
        "-m",
        "jtp.prepare",
        *files,
        "--out",
        data,
        "--bytes",
        "--val-fraction",
        str(args.val_fraction),
        "--no-progress",
    ]
    train = [
        sys.executable,
        "-m",
        "jtp.train",
        "--devices",
        "8",
        "--model",
        "llama",
        "--data",
        data,
        "--seq-len",
        "128",
        "--batch-size",
        "32",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--max-steps",
        str(args.steps),
        "--lr",
        "3e-3",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        str(args.warmup),
        "--weight-decay",
        "0.1",
        "--val-check-interval",
        str(args.val_every),
        "--log-every-n-steps",
        "10",
        "--no-enable-progress-bar",
        "--default-root-dir",
        os.path.join(tmp, "runs"),
        "--metrics-json",
        os.path.join(tmp, "m.json"),
    ]
    return prepare, train


def text(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        prepare, train = _commands(args, tmp)
        load = os.getloadavg()[0]  # other work on the machine slows the timing, not the losses
        t0 = time.perf_counter()
        subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL, timeout=600)
        t1 = time.perf_counter()
        subprocess.run(train, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        t2 = time.perf_counter()
        with open(os.path.join(tmp, "m.json")) as f:
            run = json.load(f)
        with open(os.path.join(tmp, "data", "meta.json")) as f:
            meta = json.load(f)
    payload = {
        "benchmark": "text",
        "machine": machine(),
        "platform": run["platform"],
        "mesh": run["mesh"],
        "steps": run["steps"],
        "data": {k: meta[k] for k in ("documents", "train_tokens", "val_tokens", "vocab_size")},
        "losses": run["losses"],
        "lrs": run["lrs"],
        "val_history": run["val_history"],
        "val_loss": run["val_loss"],
        "prepare_seconds": t1 - t0,
        "train_seconds": t2 - t1,
        "fit_seconds": run["fit_seconds"],
        "load_average": [load, os.getloadavg()[0]],
        "command": " ".join(os.path.basename(a) if a == sys.executable else a for a in train),
    }
    print(format_text(payload))
    write_result(args, payload)
    if args.plot:
        _plot(payload, args.plot)
    return payload


def format_text(p: dict[str, Any]) -> str:
    d = p["data"]
    head = (
        f"tiny Llama, byte-level, stdlib *.py ({d['documents']} files: "
        f"{d['train_tokens']:,} train / {d['val_tokens']:,} val bytes), mesh "
        f"{p['mesh']['data']}x{p['mesh']['tensor']} {p['platform']}, batch 32 x 128, "
        "AdamW warmup + cosine 3e-3\n"
    )
    lines = ["| step | train loss (mean of 10) | val nats/byte |", "|-----:|-----:|-----:|"]
    for v in p["val_history"]:
        s = v["step"]
        window = p["losses"][max(0, s - 10) : s]
        lines.append(f"| {s} | {sum(window) / len(window):.3f} | {v['val_loss']:.3f} |")
    verdict = "meets" if p["val_loss"] is not None and p["val_loss"] <= TARGET_NATS else "misses"
    tail = (
        f"\nfirst loss {p['losses'][0]:.2f}; {p['steps']} steps; training command "
        f"{p['train_seconds']:.0f} s wall (fit {p['fit_seconds']:.0f} s), prepare "
        f"{p['prepare_seconds']:.1f} s; {verdict} the target val <= {TARGET_NATS} nats/byte"
    )
    if "load_average" in p:
        start, end = p["load_average"]
        tail += f"\n(1-minute load average {start:.1f} before, {end:.1f} after the run)"
    return head + "\n".join(lines) + tail


def _plot(p: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'jtp[plot]'); skipped", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    steps = range(1, len(p["losses"]) + 1)
    ax.plot(steps, p["losses"], lw=0.8, label="train loss (per step)")
    val = p["val_history"]
    ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], "o-", label="validation")
    ax.axhline(TARGET_NATS, color="k", ls=":", lw=0.8, label=f"target {TARGET_NATS}")
    ax.set(xlabel="optimizer step", ylabel="nats / byte", ylim=(0, max(p["losses"][:1] + [4])))
    ax.set_title("tiny Llama on the stdlib's *.py, byte-level, 2x4 mesh", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
