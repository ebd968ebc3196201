"""``python -m jtp.bench docs [--check]``: the docs' figures, rendered from the JSON.

Every figure table in ``docs/*.md`` sits between two markers naming its JSON::

    <!-- bench:memory bench_results/memory.json -->
    ```
    ...table...
    ```
    <!-- /bench -->

and is rewritten here by the same formatter the benchmark printed it with, so a table can
never drift from its JSON (``--check`` fails instead of writing; the test suite runs it).

Both modes also fail when a result is older than the code it measures (its provenance's
source hash differs from today's, :func:`jtp.bench.results.staleness`), naming the
result, the page and the command that re-records it. Two exceptions are reported without
failing: a GPU result on a machine without a GPU (only a GPU re-runs it), and a result whose
provenance says ``"accepted_stale"`` with a reason (a person decided it waits; the page says so).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BLOCK = re.compile(
    r"(<!-- bench:(?P<kind>[\w-]+) (?P<json>\S+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S
)


def _memory(p: dict[str, Any]) -> str:
    from jtp.bench.memory import format_memory

    return format_memory(p["rows"], p["dim"])


def _overhead(p: dict[str, Any]) -> str:
    from jtp.bench.overhead import format_overhead

    return format_overhead(p)


def _llama(p: dict[str, Any]) -> str:
    from jtp.bench.llama import format_llama

    return format_llama(p["rows"])


def _capacity(p: dict[str, Any]) -> str:
    from jtp.capacity.report import format_table

    return format_table(p)


def _multihost(p: dict[str, Any]) -> str:
    from jtp.bench.multihost import format_multihost

    return format_multihost(p)


def _compile(p: dict[str, Any]) -> str:
    from jtp.bench.compile import format_compile

    return format_compile(p)


def _cache(p: dict[str, Any]) -> str:
    from jtp.bench.cache import format_cache

    return format_cache(p)


def _generate(p: dict[str, Any]) -> str:
    from jtp.bench.generate import format_generate

    return format_generate(p)


def _lora(p: dict[str, Any]) -> str:
    from jtp.bench.lora import format_lora

    return format_lora(p)


def _moe(p: dict[str, Any]) -> str:
    from jtp.bench.moe import format_moe

    return format_moe(p)


def _context(p: dict[str, Any]) -> str:
    from jtp.bench.context import format_context

    return format_context(p)


def _gpu(p: dict[str, Any]) -> str:
    from jtp.bench.gpu import format_gpu

    return format_gpu(p)


def _fp8(p: dict[str, Any]) -> str:
    from jtp.bench.fp8 import format_fp8

    return format_fp8(p)


def _text(p: dict[str, Any]) -> str:
    from jtp.bench.text import format_text

    return format_text(p)


def _lightning(p: dict[str, Any]) -> str:
    from jtp.bench.lightning import format_lightning

    return format_lightning(p)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "multihost": _multihost,
    "memory": _memory,
    "overhead": _overhead,
    "llama": _llama,
    "capacity": _capacity,
    "text": _text,
    "fp8": _fp8,
    "compile": _compile,
    "cache": _cache,
    "gpu": _gpu,
    "generate": _generate,
    "lora": _lora,
    "moe": _moe,
    "context": _context,
    "lightning": _lightning,
}


def _note(payload: dict[str, Any], stale: str | None) -> str:
    """The line above a table: where, at which commit, when; and if the code moved since."""
    prov = payload.get("provenance") or {}
    machine = payload.get("machine") or prov.get("machine")
    if not machine:
        return ""
    where = [machine]
    if prov.get("device_kind") and prov.get("platform") == "gpu":
        where.append(prov["device_kind"])
    if prov.get("commit"):
        where.append(f"jtp {prov['commit'][:7]}")
    if prov.get("date"):
        where.append(prov["date"][:10])
    note = f"Measured on: {', '.join(where)}."
    if stale:
        note += " The code it measures has changed since (docs/benchmarks.md, Provenance)."
    return note + "\n"


def _stale(payload: dict[str, Any], kind: str, root: Path) -> str | None:
    from jtp.bench.results import staleness

    return staleness(payload, kind, _reader(root))


def _reader(root: Path) -> Callable[[str], str | None]:
    def read(path: str) -> str | None:
        p = root / path
        return p.read_text() if p.is_file() else None

    return read


def render(text: str, root: Path, problems: list[tuple[str, str, dict]] | None = None) -> str:
    """``text`` with every bench block re-rendered from its JSON (paths from ``root``);
    each stale result is appended to ``problems`` as (json path, why, payload)."""

    def block(m: re.Match) -> str:
        kind = m.group("kind")
        if kind not in RENDERERS:
            raise ValueError(f"unknown bench block {kind!r}; known: {sorted(RENDERERS)}")
        payload = json.loads((root / m.group("json")).read_text())
        stale = _stale(payload, kind, root)
        if stale and problems is not None:
            problems.append((m.group("json"), stale, {"kind": kind, **payload}))
        note = _note(payload, stale)
        return f"{m.group(1)}{note}```\n{RENDERERS[kind](payload)}\n```\n{m.group(5)}"

    return BLOCK.sub(block, text)


def _verdict(result: str, page: str, why: str, payload: dict[str, Any]) -> tuple[bool, str]:
    """(fails CI, the line that says so) for one stale result shown on ``page``."""
    prov = payload.get("provenance") or {}
    kind = payload.get("kind")
    command = prov.get("command") or (
        "the python -m jtp.capacity command beside its table, with --json"
        if kind == "capacity"
        else f"python -m jtp.bench {kind} --record"
    )
    if "--record" not in command and command.startswith("python -m jtp.bench"):
        command += " --record"
    if prov.get("accepted_stale"):
        return False, f"  {result} ({page}): {why}; accepted: {prov['accepted_stale']}"
    if prov.get("platform") == "gpu" and not _have_gpu():
        return False, f"  {result} ({page}): GPU result {why}; re-run on a GPU: {command}"
    return True, f"  {result} ({page}): {why}; re-record: {command}"


def _have_gpu() -> bool:
    import jax

    return any(d.platform == "gpu" for d in jax.devices())


def docs(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    stale, failing, notes = [], [], []
    for path in sorted((root / "docs").rglob("*.md")) + [root / "README.md"]:
        text = path.read_text()
        problems: list[tuple[str, str, dict]] = []
        new = render(text, root, problems)
        page = str(path.relative_to(root))
        for result, why, payload in problems:
            fails, line = _verdict(result, page, why, payload)
            (failing if fails else notes).append(line)
        if new != text:
            stale.append(page)
            if not args.check:
                path.write_text(new)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "docs figures match their JSON")
    if notes:
        print("results older than their code, reported only:\n" + "\n".join(notes))
    if failing:
        print("results older than the code they measure:\n" + "\n".join(failing))
    if (args.check and stale) or failing:
        sys.exit(1)
    return {"stale": stale, "results_stale": failing, "results_noted": notes}
