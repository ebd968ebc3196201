"""How the programs end: a user's mistake as one line and exit status 2, and the name a
program reports itself by."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from jtp.errors import InputError


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
