"""What the programs write: JSON results and a one-line description of the machine."""

from __future__ import annotations

import json
import os
import platform
from typing import Any


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
