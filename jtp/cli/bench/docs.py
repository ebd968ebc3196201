"""``python -m jtp.bench docs [--check]``: the docs' figures, rendered from the JSON.

Every figure table in ``docs/*.md`` sits between two markers naming its JSON::

    <!-- bench:memory bench_results/memory.json -->
    ```
    ...table...
    ```
    <!-- /bench -->

and is rewritten here by the same formatter the benchmark printed it with, so a table can
never drift from its JSON (``--check`` fails instead of writing; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

BLOCK = re.compile(
    r"(<!-- bench:(?P<kind>[\w-]+) (?P<json>\S+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S
)


def _memory(p: dict[str, Any]) -> str:
    from jtp.cli.bench.memory import format_memory

    return format_memory(p["rows"], p["dim"])


def _overhead(p: dict[str, Any]) -> str:
    from jtp.cli.bench.overhead import format_overhead

    return format_overhead(p)


def _llama(p: dict[str, Any]) -> str:
    from jtp.cli.bench.llama import format_llama

    return format_llama(p["rows"])


def _plan(p: dict[str, Any]) -> str:
    from jtp.cli.planner import format_plan

    return format_plan(p["rows"], Namespace(**p["args"]), p["recommended"])


def _multihost(p: dict[str, Any]) -> str:
    from jtp.cli.bench.multihost import format_multihost

    return format_multihost(p)


def _compile(p: dict[str, Any]) -> str:
    from jtp.cli.bench.compile import format_compile

    return format_compile(p)


def _cache(p: dict[str, Any]) -> str:
    from jtp.cli.bench.cache import format_cache

    return format_cache(p)


def _generate(p: dict[str, Any]) -> str:
    from jtp.cli.bench.generate import format_generate

    return format_generate(p)


def _lora(p: dict[str, Any]) -> str:
    from jtp.cli.bench.lora import format_lora

    return format_lora(p)


def _gpu(p: dict[str, Any]) -> str:
    from jtp.cli.bench.gpu import format_gpu

    return format_gpu(p)


def _text(p: dict[str, Any]) -> str:
    from jtp.cli.bench.text import format_text

    return format_text(p)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "multihost": _multihost,
    "memory": _memory,
    "overhead": _overhead,
    "llama": _llama,
    "plan": _plan,
    "text": _text,
    "compile": _compile,
    "cache": _cache,
    "gpu": _gpu,
    "generate": _generate,
    "lora": _lora,
}


def render(text: str, root: Path) -> str:
    """``text`` with every bench block re-rendered from its JSON (paths from ``root``)."""

    def block(m: re.Match) -> str:
        kind = m.group("kind")
        if kind not in RENDERERS:
            raise ValueError(f"unknown bench block {kind!r}; known: {sorted(RENDERERS)}")
        payload = json.loads((root / m.group("json")).read_text())
        machine = payload.get("machine")
        note = f"Measured on: {machine}.\n" if machine else ""
        return f"{m.group(1)}{note}```\n{RENDERERS[kind](payload)}\n```\n{m.group(5)}"

    return BLOCK.sub(block, text)


def docs(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    stale = []
    for path in sorted((root / "docs").rglob("*.md")) + [root / "README.md"]:
        text = path.read_text()
        new = render(text, root)
        if new != text:
            stale.append(str(path.relative_to(root)))
            if not args.check:
                path.write_text(new)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "docs figures match their JSON")
    if args.check and stale:
        sys.exit(1)
    return {"stale": stale}
