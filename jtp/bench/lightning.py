"""``python -m jtp.bench lightning``: jtp against Lightning's own tensor-parallel Llama example,
whole processes, side by side on this machine's CPUs.

Lightning's side is its ``examples/pytorch/tensor_parallel`` (Llama 3, tensor + sequence +
loss parallel, FSDP2, activation checkpointing, ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=2)``) run by ``scripts/lightning_tp_llama.py`` as 4 CPU processes (gloo)
in a torch environment of its own (``--lightning-python``): that script says what it changes
(CPU, 46.4M parameters, float32, 16 steps). jtp's side is :data:`JTP_FLAGS`: the same model
(the ``lightning-46m`` preset: the same parameter count), layout, batch, optimizer and float32,
as one ``python -m jtp.train`` process on 4 forced CPU devices. The two run alternately
(``A B B A ...``, so a drift in the machine's load falls on both), ``--repeats`` times each,
and each side reports the median over its runs of:

- the process's wall time (start to exit, imports, initialisation and compile included),
- its median step time over steps 2..16 (between consecutive steps' losses reaching the host;
  jtp logs every step for this, as Lightning's progress bar does),
- its first step: from the start of training (jtp: before the compile) to step 1's loss;
- its CPU seconds (user + system, every thread; Lightning's: all 4 ranks and their data
  workers): the figure other processes on the machine disturb least.

jtp runs twice over: without its compilation cache (``jtp``: every program compiled, as a
first run) and with it warm (``jtp_cached``: a repeated run, as users run jtp by default;
an untimed run fills a cache of the benchmark's own first, and a timed run that loads
nothing from it is an error). Lightning's eager torch has nothing to cache.

jtp's process keeps freed host memory for the next step, as it does by default on CPU
(:mod:`jtp.host_memory`; the result records its ``host_memory``). Lightning's processes run
as Lightning ships them, and once more with the same glibc settings through
``GLIBC_TUNABLES`` (``jtp.host_memory.glibc_tunables()``): the ``lightning_retained`` side,
so the table shows both what a user of each gets and how much of the difference is that
setting.
Every process has ``--timeout`` seconds (its whole process group is then killed).

jtp's main environment never imports torch: Lightning's side is a subprocess of the other
Python. Without it (or the example's files) the benchmark exits 2 saying how to set them up.
Its flags are added here (:func:`add_flags`; :mod:`jtp.cli.bench` imports this module to
parse them): keep its module-level imports to the standard library and ``results``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jtp.bench.results import REPO, machine, write_result
from jtp.host_memory import glibc_tunables

RUNNER = REPO / "scripts" / "lightning_tp_llama.py"
RESULT_PREFIX = "LIGHTNING_TP_RESULT "  # the runner's machine-readable line
EXAMPLE_FILES = ("model.py", "parallelism.py", "data.py")
PRESET = "lightning-46m"  # jtp.models.llama.PRESETS: the example's ModelArgs at 46.4M
SETUP = (
    "python3.11 -m venv /work/venv-lightning && /work/venv-lightning/bin/pip install "
    "torch==2.13.0 lightning; put model.py, parallelism.py and data.py of Lightning-AI/"
    "pytorch-lightning's examples/pytorch/tensor_parallel in a folder; then pass "
    "--lightning-python /work/venv-lightning/bin/python --example-dir FOLDER"
)
# What Lightning's example runs, as python -m jtp.train flags: 2 x 2 devices, tensor +
# fsdp + sequence + loss parallel, every block recomputed; its 128 random rows of 128 + 1
# tokens, 8 per data-parallel rank (16 a step), 2 epochs = 16 steps; torch's AdamW (lr 3e-3,
# weight decay 0.01); float32. Every step logged: its loss's arrival times the step.
JTP_FLAGS = (
    "--model llama --preset lightning-46m "
    "--devices 4 --data-parallel 2 --tensor-parallel 2 "
    "--fsdp --sequence-parallel --loss-parallel --remat full "
    "--seq-len 128 --samples 128 --batch-size 16 --max-epochs 2 "
    "--lr 3e-3 --weight-decay 0.01 --precision 32-true "
    "--log-every-n-steps 1 --no-enable-progress-bar --no-compilation-cache"
).split()


def add_flags(p: argparse.ArgumentParser) -> None:
    """The sub-command's flags (``python -m jtp.bench lightning``)."""
    env = os.environ.get
    p.add_argument(
        "--lightning-python",
        default=env("LIGHTNING_PYTHON"),
        help="a Python with torch and lightning (default: $LIGHTNING_PYTHON)",
    )
    p.add_argument(
        "--example-dir",
        default=env("LIGHTNING_EXAMPLE_DIR"),
        help="the example's model.py, parallelism.py, data.py (default: $LIGHTNING_EXAMPLE_DIR)",
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side; medians")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process (killed)")


def jtp_flags(cache: str | None = None) -> list[str]:
    """:data:`JTP_FLAGS`, with a compilation ``cache`` directory instead of none when one is
    given (the repeated run's side)."""
    flags = list(JTP_FLAGS)
    if cache is not None:
        flags[flags.index("--no-compilation-cache")] = f"--compilation-cache={cache}"
    return flags


def jtp_command(python: str, metrics: str, root: str, cache: str | None = None) -> list[str]:
    """jtp's side: ``python -m jtp.train`` with :func:`jtp_flags`, writing ``metrics``."""
    return [
        python,
        "-m",
        "jtp.train",
        *jtp_flags(cache),
        "--default-root-dir",
        root,
        "--metrics-json",
        metrics,
    ]


def lightning_command(python: str, example_dir: str, root: str) -> list[str]:
    """Lightning's side: the runner script under ``python`` (a torch environment)."""
    return [python, str(RUNNER), "--example-dir", example_dir, "--root-dir", root]


def parse_runner_output(text: str) -> dict[str, Any]:
    """The JSON of the runner's ``LIGHTNING_TP_RESULT`` line (process 0 prints one)."""
    for line in text.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise ValueError(f"no {RESULT_PREFIX.strip()} line in the runner's output")


def step_figures(step_times: list[float]) -> dict[str, float]:
    """``first_step_s`` (to step 1's end) and ``median_step_s`` over steps 2..N, from the
    times (from the start of training) at which each step ended."""
    steps = [b - a for a, b in zip(step_times, step_times[1:], strict=False)]
    return {"first_step_s": step_times[0], "median_step_s": statistics.median(steps)}


def _cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and what it reaped, its stdout). Past
    ``timeout`` seconds the process and everything it started (Lightning's ranks and data
    workers) are killed and the benchmark stops saying so: a hung rank never hangs it."""
    t0, cpu0 = time.perf_counter(), _cpu_of_children()
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        cmd, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout:.0f} s: killed") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what it left behind
    wall, cpu = time.perf_counter() - t0, _cpu_of_children() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(out + err)[-3000:]}")
    return wall, cpu, out


def _jtp_run(
    env: dict[str, str], timeout: float, cache: str | None = None, *, warm: bool = True
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.json")
        wall, cpu, _ = _run(jtp_command(sys.executable, metrics, tmp, cache), env, timeout)
        m = json.loads(Path(metrics).read_text())
    if cache is not None and warm and not m["compile_cache_hits"]:
        raise RuntimeError(f"the warm run loaded nothing from its compilation cache {cache}")
    figures = step_figures(m["step_times"])
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        **figures,
        "losses": m["losses"],
        "host_memory": m["host_memory"],
        "compile_cache_hits": m["compile_cache_hits"],
    }


def _lightning_run(
    python: str, example_dir: str, timeout: float, *, retained: bool = False
) -> dict[str, Any]:
    env = dict(os.environ)
    if retained:
        env["GLIBC_TUNABLES"] = glibc_tunables()
    with tempfile.TemporaryDirectory() as tmp:
        wall, _, out = _run(lightning_command(python, example_dir, tmp), env, timeout)
    r = parse_runner_output(out)
    if not r["finite"]:
        raise RuntimeError(f"Lightning's losses are not all finite: {r['losses']}")
    if r["linear_output_dtypes"] != ["torch.float32"]:  # the fp32 policy did not take
        raise RuntimeError(f"Lightning's matmuls computed in {r['linear_output_dtypes']}")
    # its ranks are not all reaped by the launcher: each rank counts its own CPU time
    figures = step_figures(r["step_times"])
    return {
        "wall_s": wall,
        "cpu_s": r["cpu_seconds"],
        **figures,
        "losses": r["losses"],
        "runner": r,
    }


def _side_run(
    side: str, args: argparse.Namespace, env: dict[str, str], cache: str
) -> dict[str, Any]:
    """One timed run of ``side`` (one of :func:`lightning`'s four)."""
    if side.startswith("jtp"):
        return _jtp_run(env, args.timeout, cache if side == "jtp_cached" else None)
    retained = side == "lightning_retained"
    return _lightning_run(args.lightning_python, args.example_dir, args.timeout, retained=retained)


def _refuse(message: str) -> None:
    print(f"python -m jtp.bench lightning: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_setup(python: str | None, example_dir: str | None) -> None:
    """Exit 2 with one line saying what is missing and how to set it up."""
    if not RUNNER.is_file():
        _refuse(f"needs a source checkout ({RUNNER} is missing)")
    if not python or not os.access(python, os.X_OK):
        _refuse(f"no Lightning python ({python}); set one up: {SETUP}")
    missing = [f for f in EXAMPLE_FILES if not example_dir or not (Path(example_dir) / f).is_file()]
    if missing:
        _refuse(f"no {', '.join(missing)} in --example-dir {example_dir}; {SETUP}")


def _example(example_dir: str) -> dict[str, Any]:
    """Which example code ran: its folder and each file's hash."""
    files = {
        f: hashlib.sha256((Path(example_dir) / f).read_bytes()).hexdigest()[:12]
        for f in EXAMPLE_FILES
    }
    return {"dir": os.path.abspath(example_dir), "sha256": files}


def _params() -> int:
    import jax
    from flax import nnx

    from jtp.models.llama import PRESETS, Llama

    model = nnx.eval_shape(lambda: Llama(PRESETS[PRESET], rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


RATIOS = {  # key: (jtp's side, Lightning's side)
    "ratio": ("jtp", "lightning"),
    "ratio_retained": ("jtp", "lightning_retained"),
    "ratio_cached": ("jtp_cached", "lightning"),
}


def _median(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("wall_s", "cpu_s", "median_step_s", "first_step_s")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per side the medians over its runs; the ratios (:data:`RATIOS`) of the sides that
    ran: jtp / Lightning as shipped (``ratio``), with jtp's host-memory settings on
    Lightning's side too (``ratio_retained``), and jtp's repeated run with its compilation
    cache warm / Lightning as shipped (``ratio_cached``)."""
    med = {side: _median(rs) for side, rs in runs.items()}
    out: dict[str, Any] = {"median": med}
    for key, (ours, theirs) in RATIOS.items():
        if ours in med and theirs in med:
            out[key] = {k: med[ours][k] / med[theirs][k] for k in med[ours]}
    return out


def lightning(args: argparse.Namespace) -> dict[str, Any]:
    check_setup(args.lightning_python, args.example_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    sides = ("jtp", "jtp_cached", "lightning", "lightning_retained")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    cache = tempfile.mkdtemp(prefix="jtp-bench-lightning-cache-")
    try:
        print("  filling jtp's compilation cache (untimed)", file=sys.stderr, flush=True)
        _jtp_run(env, args.timeout, cache, warm=False)
        for i in range(args.repeats):
            order = sides if i % 2 == 0 else sides[::-1]  # A B C D D C B A ...
            for side in order:
                print(f"  run {i + 1}/{args.repeats}: {side}", file=sys.stderr, flush=True)
                runs[side].append(_side_run(side, args, env, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    first = runs["lightning"][0]["runner"]
    payload = {
        "benchmark": "lightning",
        "machine": machine(),
        "platform": "cpu",
        "repeats": args.repeats,
        "model": {**first["model"], "params_jtp": _params(), "params_lightning": first["params"]},
        "steps": len(runs["jtp"][0]["losses"]),
        "jtp_command": " ".join(["python -m jtp.train", *jtp_flags()]),
        # the repeated run's: a cache the benchmark filled (a temporary directory, removed)
        "jtp_cached_command": " ".join(["python -m jtp.train", *jtp_flags("DIR")]),
        "lightning_versions": first["versions"],
        "lightning_threads_per_process": first["threads_per_process"],
        "lightning_retained_glibc_tunables": glibc_tunables(),  # jtp's: each run's host_memory
        "example": _example(args.example_dir),
        "runs": {
            side: [{k: v for k, v in r.items() if k != "runner"} for r in rs]
            for side, rs in runs.items()
        },
        **summarise(runs),
    }
    print(format_lightning(payload))
    write_result(args, payload)
    return payload


def format_lightning(payload: dict[str, Any]) -> str:
    """The side-by-side table, from the benchmark's JSON."""
    m, med = payload["model"], payload["median"]
    v = payload["lightning_versions"]
    shipped = f"Lightning {v['lightning']} (torch {v['torch']}): 4 processes, gloo"
    labels = {
        "jtp": "jtp: 1 process, 4 CPU devices",
        "jtp_cached": "jtp, a repeated run: its compilation cache warm",
        "lightning": shipped,
        "lightning_retained": f"{shipped}, jtp's host memory",
    }
    ratios = {
        "ratio": "jtp / Lightning",
        "ratio_retained": "jtp / Lightning, same host memory",
        "ratio_cached": "jtp (a repeated run) / Lightning",
    }

    def loss(side: str) -> str:
        losses = payload["runs"][side][0]["losses"]
        return f"{losses[0]:.2f} -> {losses[-1]:.2f}"

    lines = [
        f"Llama {m['params_jtp'] / 1e6:.1f}M parameters (dim {m['dim']}, {m['n_layers']} layers, "
        f"{m['n_heads']} heads, FFN {m['ffn_hidden']}, vocab {m['vocab_size']}), data 2 x tensor 2 "
        f"+ fsdp + sequence + loss parallel + full remat, float32, {payload['steps']} steps of "
        f"16 x 128 tokens; median of {payload['repeats']} alternating runs per side",
        f"| {'side':<72} | {'process s':>9} | {'CPU s':>7} | {'step s (2..)':>12} | "
        f"{'first step s':>12} | {'loss (run 1)':>14} |",
        f"|{'-' * 74}|{'-' * 10}:|{'-' * 8}:|{'-' * 13}:|{'-' * 13}:|{'-' * 15}:|",
    ]

    def row(label: str, r: dict[str, float], digits: int, losses: str) -> str:
        whole = f"{r['wall_s']:>9.{digits}f} | {r['cpu_s']:>7.{digits}f}"
        steps = f"{r['median_step_s']:>12.2f} | {r['first_step_s']:>12.{digits}f}"
        return f"| {label:<72} | {whole} | {steps} | {losses:>14} |"

    lines += [row(label, med[side], 1, loss(side)) for side, label in labels.items() if side in med]
    lines += [row(label, payload[key], 2, "") for key, label in ratios.items() if key in payload]
    return "\n".join(lines)
