"""``python -m jtp.bench cache``: what the persistent compilation cache saves a repeated run.

Each configuration runs ``python -m jtp.train`` as a new process three times: without the
cache, then twice with one fresh cache directory (the first fills it, the second loads
from it). Reported per run: the process's wall seconds, the train step's compile seconds
(a load on a hit) and the fit's seconds, and how many entries the cache holds after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from jtp.bench.results import machine, write_result

CONFIGS = {
    "llama tiny, 2x4 fsdp+sp": [
        "--model",
        "llama",
        "--preset",
        "tiny",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--fsdp",
        "--sequence-parallel",
        "--loss-parallel",
        "--precision",
        "bf16-mixed",
    ],
    "feedforward 1024, 1x8": ["--dim", "1024", "--hidden-dim", "4096"],
}
RUNS = ("no cache", "cold cache", "warm cache")


def _train(args: list[str], cache: str | None, workdir: str) -> dict[str, Any]:
    metrics = os.path.join(workdir, "metrics.json")
    flag = ["--compilation-cache", cache] if cache else ["--no-compilation-cache"]
    command = [
        sys.executable,
        "-m",
        "jtp.train",
        "--devices",
        "8",
        "--max-steps",
        "2",
        "--no-progress",
        *args,
        *flag,
        "--metrics-json",
        metrics,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(metrics) as f:
        m = json.load(f)
    entries = len(os.listdir(cache)) if cache else 0
    return {
        "wall_s": wall,
        "compile_s": m["compile_seconds"],
        "fit_s": m["fit_seconds"],
        "cache_entries": entries,
    }


def cache(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as workdir:
            directory = os.path.join(workdir, "xla")
            for run in RUNS:
                row = _train(config, None if run == "no cache" else directory, workdir)
                rows.append({"config": name, "run": run, **row})
                print(f"  {name:<26} {run:<11} {row['wall_s']:6.1f} s", file=sys.stderr)
    payload = {"benchmark": "cache", "machine": machine(), "rows": rows}
    print(format_cache(payload))
    write_result(args, payload)
    return payload


def format_cache(payload: dict[str, Any]) -> str:
    lines = [
        "| configuration | run | process wall s | train-step compile s | fit s | cache entries |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['config']} | {r['run']} | {r['wall_s']:.1f} | {r['compile_s']:.2f} | "
            f"{r['fit_s']:.2f} | {r['cache_entries']} |"
        )
    return "\n".join(lines)
