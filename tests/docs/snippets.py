"""The code blocks of README.md and docs/*.md, as a reader pastes them.

Every ```python and ```bash block runs, unless an HTML comment right above it says why it
cannot here (``<!-- not run: needs 8 GPUs -->``). A comment ``<!-- run: "A" -> "B" -->``
(one or more) runs the block with ``A`` replaced by ``B``: the page shows the real size, CI
runs a small one (the page says so beside the block). The blocks of one page run in order
in one fresh directory, so a later block may use what an earlier one wrote.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")
_RUN = re.compile(r'^<!-- run: "(.*?)" -> "(.*?)" -->$')


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str  # python or bash
    code: str  # with the run substitutions applied
    not_run: str | None  # why it cannot run here, or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The python and bash blocks of ``page``, in order."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1) in ("python", "bash"):
            code, why, k = "\n".join(lines[i + 1 : end]) + "\n", None, i
            while k > 0 and lines[k - 1].startswith("<!--"):
                k -= 1
            for comment in lines[k:i]:  # top to bottom: substitutions apply in page order
                if n := _NOT_RUN.match(comment):
                    why = n.group(1)
                elif r := _RUN.match(comment):
                    if r.group(1) not in code:
                        raise ValueError(f"{page}:{i + 1}: {r.group(1)!r} is not in the block")
                    code = code.replace(r.group(1), r.group(2))
            found.append(Block(page, i + 1, m.group(1), code, why))
        i = end + 1
    return found
