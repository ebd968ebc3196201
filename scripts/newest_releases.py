"""Which of jtp's direct dependencies has a release newer than the tested pins.

    python scripts/newest_releases.py constraints.txt

Asks pip which versions a fresh, unconstrained install would take today (``pip install
--dry-run --report``: no download of packages, no install), compares them with the pins in
the constraints file and prints one line per package. Exit 0: none is newer (the tested
versions are what users get); 1: some are (``make test-latest`` then tests them); 2: pip
could not tell.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

# The packages whose releases have changed what jtp computes or whether it runs (jax 0.12.1:
# two multi-process hangs). Others are installed at their newest by test-latest too, but a
# release of one of them alone does not start it.
WATCHED = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml-dtypes",
    "safetensors",
)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def pins(path: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file."""
    found = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[_norm(name)] = version.strip()
    return found


def newest() -> dict[str, str]:
    """The versions an unconstrained install of the watched packages resolves to today."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--quiet",
                "--ignore-installed",
                "--report",
                report.name,
                *WATCHED,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if done.returncode:
            raise OSError(done.stderr.strip().splitlines()[-1:] or "pip failed")
        items = json.load(open(report.name))["install"]
    return {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def main(argv: list[str]) -> int:
    pinned = pins(argv[0])
    try:
        latest = newest()
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as err:
        print(f"newest_releases: pip could not resolve the newest releases: {err}")
        return 2
    newer = []
    for name in WATCHED:
        have, now = pinned.get(name), latest.get(name)
        mark = "" if have == now else "  <- newer than the pin"
        print(f"{name:18} pinned {have or '-':12} newest {now or '-':12}{mark}")
        if have != now:
            newer.append(name)
    return 1 if newer else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
