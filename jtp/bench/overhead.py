"""``python -m jtp.bench overhead``: what ``Trainer.fit`` costs over a bare jitted loop.

Both drive the same compiled step, shardings and loader in one process, alternating runs;
the ratio of steady-state steps/s is the trainer's cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from jtp.bench.results import machine, write_result


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from jtp.mesh import select_devices

    select_devices(8)  # 8 forced devices on CPU (before jax starts); the first 8 elsewhere

    from jtp.mesh import ModelParallelStrategy
    from jtp.parallel.replicas import check_replicas
    from jtp.recipes import FeedForwardConfig, FeedForwardTask
    from jtp.training.compile import build_state, compile_train_step, train_step
    from jtp.training.options import TrainerOptions
    from jtp.training.trainer import Trainer

    config = FeedForwardConfig(
        dim=args.dim, hidden_dim=4 * args.dim, samples=8 * args.steps, batch_size=8
    )
    strategy = ModelParallelStrategy(2, 4)

    def trainer_run() -> float:
        trainer = Trainer(
            strategy,
            max_epochs=1,
            enable_progress_bar=False,
            report_memory=False,
            logger="csv",
            default_root_dir=tempfile.mkdtemp(),
            log_every_n_steps=50,
        )
        trainer.fit(FeedForwardTask(config))
        return trainer.steps_per_second

    def bare_run() -> float:
        """The same step, shardings and loader, driven by a plain Python loop (no Trainer:
        the step is compiled by jtp.training.compile, as the Trainer's is)."""
        task = FeedForwardTask(config)
        options = TrainerOptions()
        state, rules = build_state(task, strategy, options)
        step = train_step(task, state, options, fsdp=strategy.fsdp)
        params, opt, rest = state.arrays()
        compiled = None
        n = 0
        for batch in task.train_dataloader():
            if compiled is None:
                compiled = compile_train_step(step, state, [batch], rules)
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
        check_replicas(batch)
        t0 = time.perf_counter()
        for _ in range(20):
            check_replicas(batch)
        return (time.perf_counter() - t0) / 20 * 1e3

    results: dict[str, list[float]] = {"trainer": [], "bare": []}
    for _ in range(args.repeats):
        results["bare"].append(bare_run())
        results["trainer"].append(trainer_run())
    best = {k: max(v) for k, v in results.items()}
    ratio = best["trainer"] / best["bare"]
    payload = {
        "benchmark": "overhead",
        "machine": machine(),
        "platform": jax.devices()[0].platform,
        "dim": args.dim,
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": results,
        "best_steps_per_second": best,
        "ratio": ratio,
        "check_replicas_ms_per_batch": replica_check_ms(),
    }
    print(format_overhead(payload))
    write_result(args, payload)
    return payload


def format_overhead(payload: dict[str, Any]) -> str:
    """The overhead table, from the benchmark's JSON."""
    best, ratio, check_ms = (
        payload["best_steps_per_second"],
        payload["ratio"],
        payload["check_replicas_ms_per_batch"],
    )
    return "\n".join(
        [
            f"FeedForward({payload['dim']}, {4 * payload['dim']}), mesh data 2 x tensor 4, "
            f"batch 8, {payload['steps']} steps, best of {payload.get('repeats', 3)} "
            f"({payload.get('platform', 'cpu')})",
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
