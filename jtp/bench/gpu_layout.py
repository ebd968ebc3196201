"""The layout ``python -m jtp.bench gpu`` runs: the planner's configurations for the local
GPUs, each whole scanned step compiled for them, the fastest estimate that fits."""

from __future__ import annotations

import sys
import time
from typing import Any


def n_layers(preset: str) -> int:
    from jtp.recipes.llama import preset_config

    return preset_config(preset).n_layers


def _candidates(n: int, smoke: bool, preset: str, micro_batch: int, seq: int) -> list[Any]:
    """The planner's single-node layouts (:func:`jtp.capacity.layouts`) that a
    throughput run takes: fsdp over "data" wherever there is more than one data rank, no
    sequence parallelism (T is whole on each device), every remat policy."""
    from jtp.capacity import Layout, layouts
    from jtp.recipes.llama import preset_config

    if smoke:
        return [Layout(2, n // 2, True, False, "none")]
    c = preset_config(preset)
    return [
        config
        for config in layouts(n, n, c.n_heads, c.n_kv_heads, micro_batch * n, seq)
        if config.fsdp == (config.data > 1) and not config.sequence_parallel
    ]


def choose_layout(
    preset: str,
    devices: list,
    seq: int,
    micro_batch: int,
    peak: float,
    usable: int | None,
    *,
    smoke: bool = False,
) -> tuple[Any, int | None, list[dict[str, Any]]]:
    """The planner's fastest layout that fits ``usable`` bytes (None: anything fits), the
    layer count it needs (None: the preset's), and every candidate's figures.

    Each candidate's whole scanned step is compiled for ``devices`` (:mod:`jtp.capacity.measure`)
    and ranked by the roofline estimate; if none fits, the depth is halved and they are
    compiled again."""
    from jtp.capacity import Hardware
    from jtp.capacity.measure import measure
    from jtp.capacity.roofline import estimate

    hw = Hardware(peak_tflops=peak)
    depth = layers = n_layers(preset)
    table = []
    candidates = _candidates(len(devices), smoke, preset, micro_batch, seq)
    while True:
        rows = []
        for config in candidates:
            t0 = time.perf_counter()
            m = measure(config, preset, layers, seq, micro_batch, "bf16-mixed", devices)
            seconds = time.perf_counter() - t0
            fits = usable is None or m["memory"] <= usable
            est = estimate(m, config, hw, len(devices))
            rows.append(
                {"layout": config.label(), "layers": layers, "memory_bytes": m["memory"],
                 "fits": fits, "estimated_step_s": est["step_s"], "compile_seconds": seconds,
                 "config": config}
            )  # fmt: skip
            print(f"  {config.label()}, {layers} layers: {m['memory'] / 2**30:.1f} GiB"
                  f"{'' if fits else ' (does not fit)'}", file=sys.stderr)  # fmt: skip
        table += [{k: v for k, v in r.items() if k != "config"} for r in rows]
        fitting = [r for r in rows if r["fits"]]
        if fitting:
            best = min(fitting, key=lambda r: r["estimated_step_s"])
            return best["config"], (None if layers == depth else layers), table
        if layers == 1:
            raise SystemExit("python -m jtp.bench gpu: not even one layer fits these GPUs")
        layers = max(1, layers // 2)
