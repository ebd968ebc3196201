"""README and docs/ run as written (tests/docs/snippets.py): each page's blocks in order, in
a fresh directory where the repository's fixtures and examples are at hand, with the
interpreter of this venv as ``python``, on 8 forced CPU devices only where a block forces
them itself. `make test-docs` (in CI)."""

import os
import subprocess
import sys

import pytest
from snippets import PAGES, ROOT, blocks

LINKED = ("tests", "examples", "scripts", "docs")  # paths the pages name, relative to the repo
TIMEOUT = 600


def _env(home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_NUM"))}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JTP_COMPILATION_CACHE"] = str(home / ".cache")  # on, as shipped; not the user's
    env["HOME"] = str(home)
    return env


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_runs_or_says_why_not(page, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    for block in blocks(page):
        if block.not_run:
            assert len(block.not_run) > 10, f"{block.where}: say why it cannot run here"
            continue
        command = ["bash", "-eo", "pipefail", "-c", block.code]
        if block.language == "python":
            command = [sys.executable, "-c", block.code]
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, (
            f"{block.where} ({block.language}) exited {done.returncode}:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
