"""Where a benchmark's result goes, what it records about itself, and when it is stale.

Every result carries ``provenance``: the jtp commit (and whether the measured sources
differed from it), a hash of the source files the benchmark exercises, the jax / jaxlib /
flax versions, the machine, the device kind, the date and the command. The source set is
the benchmark's module and the import closure of every ``jtp`` module it names (read from
the code, not listed by hand: a module the benchmark starts importing joins the set by
itself), plus the programs it runs as subprocesses (:data:`SUBPROCESSES`). Package
``__init__`` files come in only where a module is imported *as* a package. Left out: the
code that renders and files results (:data:`NOT_MEASURED`), so changing how a table is
printed or where it is written does not re-measure everything.

A result is *stale* when the hash of its source set today differs from the recorded one
(``python -m jtp.bench docs --check`` fails, naming the result, its page and the command
that re-records it), except a GPU result on a machine without one: that is reported
("measured at commit X, code changed since") without failing, since only a GPU re-runs it.

By default a benchmark writes to ``$JTP_BENCH_DIR`` or ``runs/bench/`` (gitignored);
``--record`` writes the committed ``bench_results/`` instead. ``--smoke`` never records, and
a GPU result is never replaced by a CPU one.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jtp.checkpoint.outputs import write_json
from jtp.host_memory import setting as host_memory

REPO = Path(__file__).resolve().parents[2]  # jtp/bench/results.py -> the repository
RECORD_DIR = REPO / "bench_results"  # what --record writes (tests point it elsewhere)
# The committed file of each benchmark, when it is not NAME.json.
RESULT_FILES = {"lora": "lora_memory.json"}
# Benchmarks that run jtp programs as processes: their code is measured too.
SUBPROCESSES = {
    "memory": ("jtp.train", "jtp.cli.train"),
    "text": ("jtp.train", "jtp.cli.train", "jtp.prepare", "jtp.cli.prepare"),
    "fp8": ("jtp.train", "jtp.cli.train", "jtp.prepare", "jtp.cli.prepare"),
    "cache": ("jtp.train", "jtp.cli.train"),
    "lightning": ("jtp.train", "jtp.cli.train", "scripts.lightning_tp_llama"),
}
# The module each result kind starts from (the planner's tables come from its program).
ENTRY = {"capacity": "jtp.cli.capacity"}
# Rendering and filing results, not measuring: outside every source set.
NOT_MEASURED = {
    "jtp/cli/output.py",
    "jtp/cli/bench.py",
    "jtp/bench/__init__.py",
    "jtp/bench/docs.py",
    "jtp/bench/results.py",
}

Reader = Callable[[str], "str | None"]  # repository path -> text, None where absent


def _worktree(path: str) -> str | None:
    p = REPO / path
    return p.read_text() if p.is_file() else None


def at_commit(commit: str, root: Path = REPO) -> Reader:
    """A reader of the files as they were at ``commit`` (for results recorded before
    provenance existed, whose commit only git history knows)."""

    def read(path: str) -> str | None:
        out = subprocess.run(
            ["git", "-C", str(root), "show", f"{commit}:{path}"], capture_output=True, text=True
        )
        return out.stdout if out.returncode == 0 else None

    return read


def _module_path(module: str, read: Reader) -> str | None:
    base = module.replace(".", "/")
    for path in (f"{base}.py", f"{base}/__init__.py"):
        if read(path) is not None:
            return path
    return None


def _imports(text: str) -> set[str]:
    """Every ``jtp`` module a file names, at any depth (imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "jtp"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "jtp":
                names.add(node.module)
                # ``from jtp.models import plans``: plans may be a module
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def source_files(benchmark: str, read: Reader = _worktree) -> list[str]:
    """The repository paths whose code ``benchmark``'s figures depend on (see module doc)."""
    roots = [ENTRY.get(benchmark, f"jtp.bench.{benchmark}"), *SUBPROCESSES.get(benchmark, ())]
    seen: set[str] = set()
    todo = [p for m in roots if (p := _module_path(m, read))]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [p for m in _imports(read(path) or "") if (p := _module_path(m, read))]
    return sorted(seen - NOT_MEASURED)


def source_hashes(benchmark: str, read: Reader = _worktree) -> dict[str, Any]:
    """``{"sha256": one hash of every file, "files": {path: first 12 hex of its hash}}``."""
    files = {
        p: hashlib.sha256((read(p) or "").encode()).hexdigest()[:12]
        for p in source_files(benchmark, read)
    }
    whole = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": whole, "files": files}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> str:
    """``x86_64, 2 cores, Linux``: where a figure was measured."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}


def provenance(benchmark: str, command: str, platform: str | None = None) -> dict[str, Any]:
    """What a result measured: see the module docstring."""
    import jax

    sources = source_hashes(benchmark)
    changed = _git("status", "--porcelain", "--", *sources["files"])
    return {
        "commit": _git("rev-parse", "HEAD"),
        # the measured sources differed from the commit (uncommitted edits)
        "dirty": bool(changed) if changed is not None else None,
        "sources": sources,
        "versions": versions(),
        "machine": machine(),
        "platform": platform or jax.devices()[0].platform,
        "host_memory": host_memory(),  # glibc's malloc settings (jtp.host_memory)
        "device_kind": jax.devices()[0].device_kind,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
    }


def result_name(benchmark: str) -> str:
    return RESULT_FILES.get(benchmark, f"{benchmark}.json")


def adhoc_dir() -> Path:
    return Path(os.environ.get("JTP_BENCH_DIR") or "runs/bench")


def _refuse(message: str) -> None:
    print(f"python -m jtp.bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def resolve_target(args: Any) -> None:
    """Before any work: set ``args.json`` to where the result goes, or refuse (exit 2)."""
    if getattr(args, "smoke", False) and args.record:
        _refuse("--smoke never records: its figures mean nothing (drop --record)")
    if args.record and not RECORD_DIR.is_dir():
        _refuse(f"--record writes a source checkout's bench_results/ (no {RECORD_DIR})")
    if args.json is None:
        folder = RECORD_DIR if args.record else adhoc_dir()
        args.json = str(folder / result_name(args.which))
    elif _inside(Path(args.json), RECORD_DIR) and not args.record:
        _refuse(f"{args.json} is a committed result: pass --record to replace it")
    if getattr(args, "plot", None) == "auto":  # beside the JSON
        args.plot = str(Path(args.json).with_suffix(".png"))
    elif getattr(args, "plot", None) and _inside(Path(args.plot), RECORD_DIR) and not args.record:
        _refuse(f"{args.plot} is a committed figure: pass --record to replace it")
    if args.which == "gpu" and getattr(args, "smoke", False):
        _keep_gpu_result(Path(args.json), "cpu")


def _keep_gpu_result(path: Path, platform: str) -> None:
    if platform == "gpu" or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return
    if old.get("platform") == "gpu":
        _refuse(
            f"{path} holds a GPU result; a {platform} run never replaces it "
            "(write elsewhere: --json PATH, or leave --record out)"
        )


def write_result(args: Any, payload: dict[str, Any]) -> None:
    """Add provenance to ``payload`` and write it where :func:`resolve_target` said."""
    platform = payload.get("platform")
    payload["provenance"] = provenance(args.which, args.command, platform)
    _keep_gpu_result(Path(args.json), payload["provenance"]["platform"])
    write_json(args.json, payload)


def staleness(payload: dict[str, Any], kind: str, read: Reader = _worktree) -> str | None:
    """Why ``payload`` (a result of ``kind``) no longer describes today's code, or None."""
    prov = payload.get("provenance")
    if not prov or "sources" not in prov:
        return "has no provenance (recorded before results said what they measured)"
    today = source_hashes(kind, read)
    if today["sha256"] == prov["sources"]["sha256"]:
        return None
    then, now = prov["sources"]["files"], today["files"]
    changed = sorted(p for p in then.keys() | now.keys() if then.get(p) != now.get(p))
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    commit = (prov.get("commit") or "?")[:10]
    return f"measured at commit {commit}; its code changed since ({shown})"
