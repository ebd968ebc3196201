"""Where jtp may write: every output path checked before any work, and never a file deleted
that jtp did not write.

A directory jtp writes whole (an HF export, a PEFT adapter, a prepared dataset) carries a
marker, ``.jtp-artifact.json``, naming its kind. Writing one replaces the target only if the
target is absent, empty, or a previous artefact of the same kind (marker, or the manifest an
older jtp wrote); anything else is refused naming the path and what it holds, since the
replace (rename aside, rename in, delete the old) would delete it. An output may never be an
input of the same run, nor hold one or sit inside one (``--export-hf`` onto
``--checkpoint-dir`` once deleted every checkpoint of the run; ``prepare SRC --out SRC`` the
source texts). Found by trying 124 bad inputs as users give them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

from safetensors import SafetensorError, safe_open

from jtp.distributed import agree_max
from jtp.errors import InputError

MARKER = ".jtp-artifact.json"

#: What each kind of artefact is called in messages.
KINDS = {
    "hf-checkpoint": "a Hugging Face checkpoint written by jtp",
    "peft-adapter": "a PEFT adapter written by jtp",
    "token-dataset": "a dataset written by python -m jtp.prepare",
    "consolidated": "a consolidated parameter file written by jtp (--export)",
}

#: The safetensors metadata entry that marks a file jtp wrote: ``{"jtp": kind}``.
FILE_KEY = "jtp"


class OutputError(InputError):
    """An output path that would lose the user's data, or cannot be written: a user mistake,
    reported in one line before any work."""


def write_marker(directory: str, kind: str) -> None:
    """Mark ``directory`` (being written) as an artefact of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown artefact kind {kind!r}")
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"kind": kind, "writer": "jtp"}, f)
        f.write("\n")


def artifact_kind(directory: str) -> str | None:
    """The kind of jtp artefact ``directory`` is, else None. Recognises the marker, and the
    directories older jtp versions wrote without one by their own manifest: a prepared
    dataset's ``meta.json`` (``"format": "jtp-tokens/..."``)."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            kind = json.load(f).get("kind")
        return kind if kind in KINDS else None
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            fmt = json.load(f).get("format", "")
        if isinstance(fmt, str) and fmt.startswith("jtp-tokens/"):
            return "token-dataset"
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _shown(entries: list[str]) -> str:
    entries = sorted(entries)
    more = f", ... ({len(entries)} in all)" if len(entries) > 5 else ""
    return ", ".join(entries[:5]) + more


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _overlaps(a: str, b: str) -> bool:
    """``a`` and ``b`` are one path, or one lies inside the other."""
    a, b = _real(a), _real(b)
    return (
        a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)
    )


def move_into_place(tmp: str, path: str) -> None:
    """Rename the finished directory ``tmp`` onto ``path``, replacing what is there (checked
    first to be absent, empty or jtp's own of the same kind): readers see the old directory
    or the new one, never a mix, and the old one stays whole until the new one is in."""
    old = None
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def check_not_an_input(path: str, flag: str, inputs: Iterable[tuple[str, str | None]]) -> None:
    """Refuse an output that is, holds or sits inside an input (``(flag, path)`` pairs)."""
    for name, other in inputs:
        if other and _overlaps(path, other):
            raise OutputError(
                f"{flag} {path} overlaps {name} {other}: an output may not be an input of the "
                "same run (writing it would replace or mix with what the run reads); choose "
                "another path"
            )


def _check_parent(path: str, flag: str, *, parents: bool = False) -> None:
    """The directory ``path`` goes into exists and is writable (with ``parents``: the nearest
    existing ancestor, under which the missing ones will be made)."""
    parent = os.path.dirname(_real(path))
    if parents:
        while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        missing = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise OutputError(f"{flag} {path}: its parent directory {parent} {missing}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path}: its parent directory {parent} is not writable")


def check_output_dir(
    path: str,
    kind: str,
    *,
    flag: str,
    inputs: Iterable[tuple[str, str | None]] = (),
    parents: bool = False,
) -> None:
    """Refuse, before any work, a directory output of ``kind`` that cannot be written whole
    or whose replacement would delete what jtp did not write.

    Accepted: ``path`` absent (its parent an existing, writable directory; with ``parents``
    the nearest existing ancestor), an empty directory, or a previous artefact of the same
    kind. Raises :class:`OutputError` naming ``flag``, the path and what it holds.
    """
    check_not_an_input(path, flag, inputs)
    _check_parent(path, flag, parents=parents)
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputError(
            f"{flag} {path} is a file, not a directory: jtp writes "
            f"{KINDS[kind].split(' written')[0]} as a directory; choose a new or empty directory"
        )
    entries = os.listdir(path)
    if not entries:
        return
    found = artifact_kind(path)
    if found == kind:
        if not os.access(path, os.W_OK):
            raise OutputError(f"{flag} {path} is not writable")
        return
    what = (
        f"{KINDS[found]}, not {KINDS[kind]}"
        if found
        else f"files jtp did not write: {_shown(entries)}"
    )
    raise OutputError(
        f"{flag} {path} already holds {what}. jtp replaces only an empty directory or its own "
        "output of the same kind, so nothing else is deleted; choose a new or empty directory"
    )


def file_kind(path: str) -> str | None:
    """The kind a safetensors file jtp wrote records in its header metadata, else None."""
    try:
        with safe_open(path, framework="numpy") as f:
            kind = (f.metadata() or {}).get(FILE_KEY)
    except (OSError, SafetensorError):
        return None
    return kind if kind in KINDS else None


def check_output_file(
    path: str,
    *,
    flag: str,
    inputs: Iterable[tuple[str, str | None]] = (),
    kind: str | None = None,
) -> None:
    """Refuse, before any work, a file output that is a directory, lies in a missing or
    read-only directory, or is an input of the run; with ``kind``, an existing file is
    replaced only if jtp wrote it as that kind (:func:`file_kind`)."""
    check_not_an_input(path, flag, inputs)
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a directory; give a file name")
    _check_parent(path, flag)
    if not os.path.lexists(path):
        return
    if not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path} exists and is not writable")
    if kind is not None and file_kind(path) != kind:
        raise OutputError(
            f"{flag} {path} exists and is not {KINDS[kind]}: jtp replaces only its own "
            "output of the same kind; choose a new file name"
        )


def checked_on_process_0(check: Callable[[], None], path: str, what: str) -> None:
    """Run ``check`` (which raises :class:`OutputError`) on process 0, the one that writes,
    and raise on every process if it refused: all go on to the gathers or none does."""
    import jax

    problem = None
    if jax.process_index() == 0:
        try:
            check()
        except OutputError as err:
            problem = err
    if agree_max(int(problem is not None)):
        raise problem or OutputError(f"{what}: process 0 refused the output path {path}")


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
