"""Token files: a flat array of token ids on disk, read as fixed windows by memory map.

The layout ``python -m jtp.prepare`` writes (and anything else may write)::

    DIR/train.bin   token ids, native byte order, no header
    DIR/val.bin     the same for validation
    DIR/meta.json   {"vocab_size", "dtype", "max_token_id", "train_tokens", "val_tokens",
                     "tokenizer", ...}

Windows overlap by one token so every token is a label exactly once: sample ``i`` is
``tokens[i*L : (i+1)*L + 1]`` (inputs ``[:-1]``, labels ``[1:]``). A memory map reads only
the pages of the windows asked for, so a process touches only its data ranks' rows.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jtp.errors import InputError

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids ``0 .. vocab_size - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit in uint32")


def read_meta(directory: str) -> dict[str, Any]:
    """``DIR/meta.json`` as a dict; a clear error when it is missing or not jtp's."""
    path = os.path.join(directory, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise InputError(
            f"{path} not found: {directory} is not a prepared token directory; "
            "make one with: python -m jtp.prepare FILES... --out DIR --bytes"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(
            f"{path} is not valid JSON ({err}); rewrite it with python -m jtp.prepare"
        ) from None
    if not isinstance(meta, dict):
        raise InputError(f"{path} is not a JSON object; rewrite it with python -m jtp.prepare")
    missing = [k for k in ("vocab_size", "dtype") if k not in meta]
    if missing:
        raise InputError(f"{path} lacks {missing}; rewrite it with python -m jtp.prepare")
    return meta


class TokenDataset:
    """Windows of ``seq_len + 1`` token ids from a flat token file, memory-mapped.

    Args:
      path: the token file (e.g. ``DIR/train.bin``).
      seq_len: tokens the model sees per sample; each sample holds ``seq_len + 1`` ids.
      vocab_size: the model's vocabulary. An id at or above it is a ``ValueError`` naming
        the file, the id and the vocabulary size: up front when ``meta.json`` records the
        file's largest id, else when the window holding it is read. ``None``: the
        vocabulary in ``meta.json``.
      dtype: the ids' dtype; ``None``: from ``meta.json`` beside the file.

    Example::

      train = jtp.TokenDataset("data/train.bin", seq_len=128, vocab_size=256)
      loader = jtp.DataLoader(train, 32, mesh=mesh, shuffle=True)
    """

    def __init__(
        self, path: str, seq_len: int, *, vocab_size: int | None = None, dtype: Any = None
    ):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"TokenDataset: seq_len={seq_len!r} must be a positive int")
        self.path, self.seq_len = str(path), seq_len
        meta = self._meta_beside(self.path, dtype)
        self.meta = meta
        self.dtype = np.dtype(dtype if dtype is not None else meta["dtype"])
        self.vocab_size = vocab_size if vocab_size is not None else meta.get("vocab_size")
        size = os.path.getsize(self.path)
        if size % self.dtype.itemsize:
            raise InputError(
                f"{self.path}: {size} bytes is not a whole number of {self.dtype} ids; "
                "wrong dtype, or a truncated file"
            )
        n = size // self.dtype.itemsize
        stated = meta.get(f"{os.path.splitext(os.path.basename(self.path))[0]}_tokens")
        if isinstance(stated, int) and n != stated:
            raise InputError(
                f"{self.path} holds {n} tokens, its meta.json says {stated}: it was truncated "
                "or replaced after python -m jtp.prepare wrote it; prepare the data again"
            )
        if n < seq_len + 1:
            raise InputError(
                f"{self.path} holds {n} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}; use more text or a shorter seq_len"
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n,))
        self.length = (n - 1) // seq_len
        largest = meta.get("max_token_id")
        if self.vocab_size is not None and largest is not None and largest >= self.vocab_size:
            self._out_of_vocab(int(largest), "its largest, per meta.json")

    @staticmethod
    def _meta_beside(path: str, dtype: Any) -> dict[str, Any]:
        meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), META)
        if os.path.exists(meta_path):
            return read_meta(os.path.dirname(meta_path))
        if dtype is None:
            raise ValueError(
                f"TokenDataset: no {META} beside {path}; pass dtype= (and vocab_size=), or "
                "write the file with python -m jtp.prepare"
            )
        return {}

    def _out_of_vocab(self, token: int, where: str) -> None:
        raise ValueError(
            f"{self.path}: token id {token} ({where}) is outside the model's vocabulary of "
            f"{self.vocab_size} (ids 0..{self.vocab_size - 1}); prepare the data with the "
            "model's tokenizer, or give the model that vocabulary"
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        """Window ``index``: ``seq_len + 1`` ids as int32 (what embeddings index with)."""
        if not 0 <= index < self.length:
            raise IndexError(f"TokenDataset index {index} out of range [0, {self.length})")
        start = index * self.seq_len
        window = np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)
        if self.vocab_size is not None and int(window.max()) >= self.vocab_size:
            token = int(window.max())
            offset = start + int(np.argmax(window))
            self._out_of_vocab(token, f"at position {offset}, window {index}")
        return window
