"""What the programs write: JSON results and a one-line description of the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

from jtp.errors import InputError


def machine() -> str:
    """``x86_64, 2 cores, Linux``: where a figure was measured."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def write_json(path: str | None, payload: dict[str, Any], *, announce: bool = True) -> None:
    """Write ``payload`` to ``path`` (directories created; nothing if ``path`` is None),
    through a temporary file renamed at the end: a reader sees the old file or the new one."""
    if not path:
        return
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    if announce:
        print(f"wrote {path}")


@contextlib.contextmanager
def one_line_errors(
    program: str, errors: tuple[type[BaseException], ...] = (InputError,)
) -> Iterator[None]:
    """A user's mistake (``errors``) in ``program`` becomes one line on stderr and exit
    status 2; anything else keeps its traceback (it is a bug, or the machine's failure)."""
    try:
        yield
    except errors as err:
        print(f"python -m {program}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def program(module_form: str) -> str:
    """The name a program reports in its usage line: ``jtp NAME`` when the ``jtp`` command
    started it (:mod:`jtp.cli.main` sets ``sys.argv[0]``), else ``module_form``
    (``python -m jtp.NAME``)."""
    return sys.argv[0] if sys.argv[0].startswith("jtp ") else module_form
