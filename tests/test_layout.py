"""The package layout holds: library code never imports the programs, no module imports a
package it lives in, there is no import cycle (function-level and ``TYPE_CHECKING`` imports
count: a type-only cycle is still two modules that must be read together), what reads
compiled programs (``jtp.analysis``) knows nothing of training, modules stay small, and the
tests mirror the packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "jtp"
# `python -m` shims
ENTRY_POINTS = {
    "jtp.__main__",
    "jtp.train",
    "jtp.plan",
    "jtp.prepare",
    "jtp.eval",
    "jtp.generate",
    "jtp.capacity.__main__",
    "jtp.bench.__main__",
}
PROGRAMS = ("jtp.cli", "jtp.bench")  # argument parsing and printing; the benchmarks
MAX_LINES = 500  # DESIGN: ~500 a soft guide; past it, split by concept
CLI_LINES = 1_600  # DESIGN: cli/ parses arguments and prints, ~1,500 lines


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """jtp modules imported anywhere in the file, type-only and function-level imports
    included (``from a import b`` counts ``a.b`` when that is a module, else ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m == "jtp" or m.startswith("jtp.")}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _is_library(name: str) -> bool:
    return not (name.startswith(PROGRAMS) or name in ENTRY_POINTS)


def test_library_never_imports_the_programs():
    """No library module imports ``jtp.cli`` or ``jtp.bench``: what a user imports works
    without the programs (the ``python -m`` shims are the programs' own)."""
    bad = {m: sorted(i for i in deps if i.startswith(PROGRAMS)) for m, deps in GRAPH.items()}
    assert not {m: d for m, d in bad.items() if d and _is_library(m)}


def _private_imports(path: Path) -> set[str]:
    """``from jtp.x import _name`` and imports of a ``_module`` under jtp."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jtp."):
            if any(part.startswith("_") for part in node.module.split(".")):
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")}
    return found


def test_the_programs_use_the_library_through_public_names():
    """``jtp/cli`` and ``jtp/bench`` drive the library as a user would: no private name
    (``_x``) or private module of a library package."""
    bad = {}
    for name, path in MODULES.items():
        if name.startswith(PROGRAMS):
            hits = {i for i in _private_imports(path) if not i.startswith(PROGRAMS)}
            if hits:
                bad[name] = sorted(hits)
    assert not bad


def test_the_programs_package_stays_argument_parsing():
    """``jtp/cli`` is flags, dispatch and printing; library code lives in packages named
    for it (capacity, recipes, training, data, ...)."""
    lines = sum(
        len(p.read_text().splitlines()) for n, p in MODULES.items() if n.startswith("jtp.cli")
    )
    assert lines <= CLI_LINES


def test_analysis_knows_nothing_of_training():
    """``jtp.analysis`` reads compiled programs; the planner compiles through
    ``jtp.training.compile`` and hands the result over, never the other way round."""
    bad = {
        m: sorted(d for d in deps if d.startswith(("jtp.training", "jtp.data", "jtp.checkpoint")))
        for m, deps in GRAPH.items()
        if m.startswith("jtp.analysis")
    }
    assert not {m: d for m, d in bad.items() if d}


def test_checkpoint_files_and_data_stand_below_training():
    """Models (``jtp.models.hf`` writes files), data and checkpoint files never import the
    training loop."""
    low = ("jtp.models", "jtp.data", "jtp.checkpoint", "jtp.parallel", "jtp.mesh")
    bad = {
        m: sorted(d for d in deps if d.startswith("jtp.training"))
        for m, deps in GRAPH.items()
        if m.startswith(low)
    }
    assert not {m: d for m, d in bad.items() if d}


def test_no_module_imports_a_package_it_lives_in():
    bad = {}
    for name, deps in GRAPH.items():
        parts = name.split(".")
        if name == "jtp":
            continue  # the root re-exports its subpackages: that is its whole job
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        if hits := sorted(deps & ancestors):
            bad[name] = hits
    assert not bad, bad


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_packages_stand_in_floors():
    """No two packages import each other, even through different modules: a package can
    be read knowing only those below it. (The ``python -m`` shims belong to the programs.)"""
    deps: dict[str, set[str]] = {}
    for name, imported in GRAPH.items():
        if name in ENTRY_POINTS or name == "jtp":
            continue
        deps.setdefault(_package(name), set()).update(
            _package(d) for d in imported if _package(d) != _package(name)
        )
    both = {(a, b) for a, ds in deps.items() for b in ds if a < b and a in deps.get(b, ())}
    assert not both


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH:
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_modules_are_small():
    big = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: lines for n, lines in big.items() if lines > MAX_LINES}


def test_tests_mirror_the_packages():
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert packages == {
        "analysis",
        "bench",
        "capacity",
        "checkpoint",
        "cli",
        "data",
        "distributed",
        "generation",
        "models",
        "parallel",
        "recipes",
        "training",
    }
    assert all((ROOT / "tests" / name).is_dir() for name in packages)


def test_the_checker_sees_function_level_and_type_only_imports(tmp_path):
    """A guard on the guard: the CLI's lazy imports inside main() are in the graph, and so
    is an import under ``if TYPE_CHECKING:``."""
    assert "jtp.recipes" in GRAPH["jtp.cli.train"]
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jtp.mesh\n")
    assert _imports(probe) == {"jtp.mesh"}


def test_the_fit_loop_reads_on_one_screen():
    """Trainer.fit delegates (policy, fit run, resume, state): it stays <= 50 lines."""
    tree = ast.parse(MODULES["jtp.training.trainer"].read_text())
    fit = next(
        node
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name == "Trainer"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "fit"
    )
    assert fit.end_lineno - fit.lineno + 1 <= 50


def test_only_the_trainer_touches_its_private_fields():
    """``trainer._anything`` (or ``self.trainer._anything``) appears nowhere but in the
    Trainer itself: the fit run, checkpoint save/restore and the benchmarks are handed
    values and return results."""
    files = {n: p for n, p in MODULES.items() if n != "jtp.training.trainer"}
    files.update({str(p): p for p in (ROOT / "tests").rglob("*.py")})
    hits = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            owner = node.value
            owner_name = getattr(owner, "id", None) or getattr(owner, "attr", None)
            if owner_name == "trainer" and not node.attr.startswith("__"):
                hits.append(f"{name}:{node.lineno} {owner_name}.{node.attr}")
    assert not hits


def test_no_fault_injection_in_library_code():
    """Faults are injected by tests from outside (wrapper scripts), never by env switches."""
    hits = [n for n, p in MODULES.items() if "JTP_FAULT" in p.read_text()]
    assert not hits


def test_the_avx2_run_names_tests_that_exist():
    """``make test-avx2`` (CI) lists tests by id: a moved or renamed test must not silently
    drop out of it (pytest would stop on a missing file, but not on a renamed parameter)."""
    import re

    text = (ROOT / "Makefile").read_text()
    block = text[text.index("AVX2_TESTS :=") :].split("\n\n")[0]
    for entry in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", block):
        path, name = entry
        assert (ROOT / path).exists(), path
        if name:
            assert f"def {name}(" in (ROOT / path).read_text(), (path, name)


def test_one_block_forward():
    """Training and generation run one block forward: the key/value cache is an argument of
    the decoder's ``__call__`` (``jtp.models.decoder``), so no other module calls a block's
    parts, and a block feature (experts) is written once. There is no ``jtp.models.decode``."""
    block = {"attention_norm", "attention", "ffn_norm", "feed_forward"}
    parts = block | {"post_attention_norm", "post_ffn_norm", "wq", "wk", "wv", "wo"}
    parts |= {"tok_embeddings"}
    hits = [
        f"{name}:{node.lineno} .{node.func.attr}(...)"
        for name, path in MODULES.items()
        if name != "jtp.models.decoder"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in parts
    ]
    assert not hits
    assert "jtp.models.decode" not in MODULES


def test_code_is_formatted_not_packed():
    """``ruff format`` lays every statement out; none is packed under a line budget with
    ``# fmt: skip`` (or ``fmt: off``)."""
    packed = [
        n for n, p in MODULES.items() if "fmt: skip" in p.read_text() or "fmt: off" in p.read_text()
    ]
    assert not packed
