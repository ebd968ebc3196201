"""A checkpoint step that knows its own integrity: a manifest of every file's size and SHA-256.

orbax commits a step atomically, but nothing in it notices damage that comes later: 16
flipped bytes in the middle of an array file (bit rot, a bad copy) were resumed from without
a word (the losses moved by 1e-6, and the damaged state was saved again as the next step);
a truncated or deleted array file ended in tensorstore tracebacks instead of the fallback to
an older step. So once a step is committed, process 0 writes ``jtp_manifest.json`` into it
(every file, its size and digest), and a restore verifies the files first: each process
checks its share of them, and a step that any process finds damaged is skipped by all (the
agreement in :class:`jtp.checkpoint.sharded.Checkpointer`). A step without a manifest (written
by an older jtp, or by a process killed between the commit and the manifest) is restored
unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os

NAME = "jtp_manifest.json"
_CHUNK = 1 << 22


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file of the step, relative to it, in a fixed order (the manifest excluded)."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != NAME and not name.startswith(f".{NAME}"):
                found.append(rel)
    return sorted(found)


def write_manifest(step_dir: str) -> None:
    """Record every file of the committed step ``step_dir`` (atomically: a reader sees the
    whole manifest or none)."""
    files = {
        rel: {
            "bytes": os.path.getsize(os.path.join(step_dir, rel)),
            "sha256": _digest(os.path.join(step_dir, rel)),
        }
        for rel in _files(step_dir)
    }
    tmp = os.path.join(step_dir, f".{NAME}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"format": "jtp-checkpoint-manifest/1", "files": files}, f, indent=0)
    os.replace(tmp, os.path.join(step_dir, NAME))


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, NAME))


def damage(step_dir: str, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with the files of ``step_dir`` against its manifest, or None.

    ``share=(i, n)``: check only every n-th listed file from the i-th (process i of n checks
    its part; the caller agrees on the result). Missing, resized and altered files are
    named; a manifest that cannot be read is itself damage. No manifest: None (unverified).
    """
    path = os.path.join(step_dir, NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        listed = sorted(files.items())
    except (OSError, ValueError, KeyError, AttributeError) as err:
        return f"its manifest {path} is unreadable ({err})"
    index, count = share
    for rel, want in listed[index::count]:
        file = os.path.join(step_dir, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        size = os.path.getsize(file)
        if size != want["bytes"]:
            return f"{rel} has {size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _digest(file) != want["sha256"]:
            return f"{rel} does not match its checksum (altered or corrupted since the save)"
    return None
