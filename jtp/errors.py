"""The error of a user's mistake, told apart from a bug.

A program (``python -m jtp.train`` and the others) prints an :class:`InputError` as one line
naming the flag, field or path to fix and exits 2, without a traceback; any other exception
is a bug or an environment failure and keeps its traceback. It is a ``ValueError``, so code
that caught those still catches these.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad input (flag, config field, path, dataset, prompt): the message says what to fix."""
