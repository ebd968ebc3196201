"""``jtp``: one command for every program, installed with the package.

    jtp train --devices 8 --model llama --preset tiny     # = python -m jtp.train ...
    jtp prepare FILES... --out DIR                        # = python -m jtp.prepare ...
    jtp eval --hf DIR --data DIR                          # = python -m jtp.eval ...
    jtp generate --hf DIR --prompt "..."                  # = python -m jtp.generate ...
    jtp capacity --model llama3-8b --devices 64           # = python -m jtp.capacity ...
    jtp bench memory                                      # = python -m jtp.bench ...

Each subcommand is the ``python -m jtp.X`` program of the same name, with the same flags
(``jtp SUBCOMMAND --help``); ``python -m jtp SUBCOMMAND`` works where the script is not on
the PATH. A subcommand's module is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (the module whose run() it is, one line of help)
COMMANDS = {
    "train": ("jtp.cli.train", "train a model (FeedForward, Llama, a Hugging Face checkpoint)"),
    "prepare": ("jtp.cli.prepare", "tokenize text files into a token directory"),
    "eval": ("jtp.cli.eval", "score a split of a token directory: loss and perplexity"),
    "generate": ("jtp.cli.generate", "generate text with a KV cache, sharded"),
    "capacity": ("jtp.cli.capacity", "which layout fits a cluster, and what it costs"),
    "bench": ("jtp.cli.bench", "the benchmarks whose figures the docs show"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: jtp {" + ",".join(COMMANDS) + "} ...\n\n"
        "tensor parallelism for JAX and Flax NNX; each subcommand is python -m jtp.NAME\n\n"
        + "\n".join(lines)
        + "\n\nrun 'jtp SUBCOMMAND --help' for its flags"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the subcommand ``argv[0]`` with the rest of ``argv`` (default: the command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"jtp {version('jtp')}")
        except PackageNotFoundError:
            print("jtp (not installed)")
        return
    name, rest = argv[0], argv[1:]
    if name == "plan":  # the capacity planner's old name: say where it went, run nothing
        again = " ".join(["jtp capacity", *rest])
        print(f"jtp: the capacity planner is jtp capacity (same flags): {again}", file=sys.stderr)
        sys.exit(2)
    if name not in COMMANDS:
        print(f"jtp: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"jtp {name}", *rest]  # what the program parses and reports
    importlib.import_module(COMMANDS[name][0]).run()
