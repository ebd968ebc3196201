"""Text files -> the token files :class:`jtp.TokenDataset` reads (:func:`prepare`; the
program is ``jtp prepare``, :mod:`jtp.cli.prepare`).

Each file is one document (a directory stands for every file under it, hidden ones
skipped), encoded byte-level (``byte_level``: its raw bytes, vocabulary 256) or, as UTF-8
text, by a Hugging Face ``tokenizers`` file (``tokenizer.json``, or a checkpoint directory
holding one; with the special tokens its post-processor adds, e.g. Llama's begin-of-text). The
last ``--val-fraction`` of each document's tokens goes to ``val.bin`` (so validation samples
every document), the rest to ``train.bin``; ``meta.json`` records the vocabulary, dtype,
counts and tokenizer. ``DIR`` appears complete or not at all: everything is written into a
temporary directory beside it that is renamed into place at the end, and removed on any
error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jtp.checkpoint.outputs import OutputError, check_output_dir, move_into_place, write_marker
from jtp.data.tokens import META, token_dtype

CHUNK_BYTES = 8 << 20  # documents encoded per tokenizer call (it batches on its own threads)


def expand(paths: list[str]) -> list[Path]:
    """The files named: files as given, directories as every non-hidden file under them."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            visible = (f for f in path.rglob("*") if not _hidden(f.relative_to(path)))
            files.extend(sorted(f for f in visible if f.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{name}: no such file or directory")
    if not files:
        raise ValueError(f"no files to read in {paths}")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror or err})") from None


def load_tokenizer(path: str) -> tuple[Any, Path]:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a directory holding one)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(
            "--tokenizer needs the tokenizers package: pip install 'jtp[data]'"
        ) from None
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there")
    try:
        return Tokenizer.from_file(str(file)), file
    except Exception as err:  # tokenizers raises a bare Exception for a bad file
        raise ValueError(
            f"--tokenizer {file} is not a Hugging Face tokenizers file (tokenizer.json): {err}"
        ) from None


Encoded = Iterator[tuple[Path, int, np.ndarray]]  # (file, its bytes, its token ids)


def _encode_bytes(files: list[Path]) -> Encoded:
    for path in files:
        data = _read(path)
        yield path, len(data), np.frombuffer(data, np.uint8)


def _encode_text(files: list[Path], tokenizer: Any) -> Encoded:
    def encode(batch: list[tuple[Path, bytes]]) -> Encoded:
        texts = []
        for path, data in batch:
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text ({err}); pass text files") from None
        for (path, data), enc in zip(batch, tokenizer.encode_batch(texts), strict=True):
            yield path, len(data), np.asarray(enc.ids, np.int64)

    batch, size = [], 0
    for path in files:
        data = _read(path)
        batch.append((path, data))
        size += len(data)
        if size >= CHUNK_BYTES:
            yield from encode(batch)
            batch, size = [], 0
    yield from encode(batch)


def _write_splits(
    tmp: Path, docs: Encoded, dtype: np.dtype, val_fraction: float, advance: Callable
) -> dict[str, int]:
    """Write each document's head to train.bin and tail to val.bin; the counts. The split
    carries its rounding across documents, so val holds round(fraction x tokens so far)."""
    counts = {"train_tokens": 0, "val_tokens": 0, "max_token_id": -1, "documents": 0}
    limit = np.iinfo(dtype).max
    with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val:
        for path, size, ids in docs:
            if ids.size and int(ids.max()) > limit:
                raise ValueError(f"{path}: token id {int(ids.max())} does not fit in {dtype}")
            seen = counts["train_tokens"] + counts["val_tokens"] + ids.size
            n_val = min(ids.size, round(val_fraction * seen) - counts["val_tokens"])
            train.write(ids[: ids.size - n_val].astype(dtype).tobytes())
            val.write(ids[ids.size - n_val :].astype(dtype).tobytes())
            counts["train_tokens"] += ids.size - n_val
            counts["val_tokens"] += n_val
            if ids.size:
                counts["max_token_id"] = max(counts["max_token_id"], int(ids.max()))
            counts["documents"] += 1
            advance(size)
    return counts


def prepare(
    paths: list[str],
    out: str,
    *,
    byte_level: bool = False,
    tokenizer: str | None = None,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out``/{train.bin, val.bin, meta.json} from ``paths``; returns the meta."""
    if byte_level == (tokenizer is not None):
        raise ValueError("give exactly one of --bytes or --tokenizer PATH")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    target = Path(out)
    inputs = [("FILES", p) for p in paths] + [("--tokenizer", tokenizer)]
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists; remove it or pass --overwrite")
    check_output_dir(out, "token-dataset", flag="--out", inputs=inputs, parents=True)
    files = expand(paths)
    meta: dict[str, Any] = {"format": "jtp-tokens/1", "val_fraction": val_fraction}
    if byte_level:
        meta.update(vocab_size=256, tokenizer="bytes")
        docs = _encode_bytes(files)
    else:
        tok, file = load_tokenizer(tokenizer)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        vocab = tok.get_vocab_size(with_added_tokens=True)
        meta.update(vocab_size=vocab, tokenizer=str(file.resolve()), tokenizer_sha256=digest)
        docs = _encode_text(files, tok)
    dtype = token_dtype(meta["vocab_size"])
    meta["dtype"] = dtype.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        with _BytesProgress(progress, sum(f.stat().st_size for f in files)) as advance:
            meta.update(_write_splits(tmp, docs, dtype, val_fraction, advance))
        _check_counts(meta, len(files))
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        write_marker(str(tmp), "token-dataset")
        move_into_place(str(tmp), str(target))  # --overwrite: the old DIR whole until then
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_counts(meta: dict[str, Any], n_files: int) -> None:
    if meta["train_tokens"] + meta["val_tokens"] == 0:
        raise ValueError(f"no tokens: the {n_files} input file(s) are empty")
    if meta["train_tokens"] == 0:
        raise ValueError("--val-fraction leaves no training tokens")
    if meta["val_fraction"] > 0 and meta["val_tokens"] == 0:
        raise ValueError(
            f"--val-fraction {meta['val_fraction']} of {meta['train_tokens']} tokens leaves no "
            "validation tokens; give more text or --val-fraction 0"
        )


class _BytesProgress:
    """A rich bar over the input bytes (``advance(n)``); a no-op when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self.bar = Progress(
            "tokenizing",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        task = self.bar.add_task("", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.stop()
