"""``jtp prepare`` (``python -m jtp.prepare``): text files -> the token files
:class:`jtp.TokenDataset` reads (:func:`jtp.data.prepare.prepare`).

    python -m jtp.prepare notes/*.txt --out data --bytes
    python -m jtp.prepare corpus/ --out data --tokenizer HF_DIR/tokenizer.json --val-fraction 0.05
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jtp.cli.output import one_line_errors, program
from jtp.data.prepare import prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program("python -m jtp.prepare"),
        description="Tokenize text files into DIR/train.bin, DIR/val.bin and DIR/meta.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILES", help="text files or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--bytes", action="store_true", help="byte-level: vocabulary 256")
    how.add_argument(
        "--tokenizer", metavar="PATH", help="a tokenizer.json, or a directory holding one"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of tokens kept for validation"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    meta = prepare(
        args.files,
        args.out,
        byte_level=args.bytes,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{args.out}: train.bin {meta['train_tokens']:,} tokens, val.bin "
        f"{meta['val_tokens']:,} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,}, "
        f"{'bytes' if args.bytes else 'tokenizer ' + meta['tokenizer']}) from "
        f"{meta['documents']:,} files"
    )
    return meta


def run() -> None:
    """The ``python -m jtp.prepare`` entry point: errors as one line, exit status 2."""
    with one_line_errors("jtp.prepare", (ValueError, ImportError)):
        main(sys.argv[1:])
