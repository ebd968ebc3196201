"""A safetensors file written one tensor at a time: the header first (every name, dtype and
shape is known in advance), then each tensor's bytes as it arrives.

``safetensors.numpy.save_file`` needs every tensor in memory at once; a consolidated export
of a model that only fits sharded must not. The file is written under a temporary name and
renamed when complete, so a reader sees the whole file or none.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors spelling of a numpy (or ml_dtypes) dtype."""
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"safetensors has no dtype for {name}; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


class TensorFileWriter:
    """Write ``specs`` (``[(name, shape, dtype)]``, in file order) to ``path``.

    Use as a context manager; call :meth:`write` once per name, in order. Leaving the block
    without an exception renames the finished file into place; with one, removes it.
    ``metadata`` goes to the header's ``__metadata__`` (transformers checks ``format: pt``).
    """

    def __init__(
        self,
        path: str,
        specs: Sequence[tuple[str, tuple[int, ...], Any]],
        *,
        metadata: dict[str, str] | None = None,
    ):
        self.path, self.tmp = path, f"{path}.tmp-{os.getpid()}"
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, shape, dtype in specs:
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": safetensors_dtype(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._order = [name for name, _, _ in specs]
        self._header = header
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def __enter__(self) -> TensorFileWriter:
        return self

    def write(self, name: str, array: np.ndarray) -> None:
        """Append ``name``'s bytes (the next name in order, with its declared shape)."""
        expected = self._order.pop(0) if self._order else None
        if name != expected:
            raise ValueError(f"tensor file {self.path}: got {name!r}, expected {expected!r}")
        entry = self._header[name]
        if list(array.shape) != entry["shape"] or safetensors_dtype(array.dtype) != entry["dtype"]:
            raise ValueError(
                f"tensor file {self.path}: {name!r} is {array.dtype}{list(array.shape)}, "
                f"declared {entry['dtype']}{entry['shape']}"
            )
        self._file.write(np.ascontiguousarray(array).tobytes())

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._file.close()
        if exc_type is None and not self._order:
            os.replace(self.tmp, self.path)  # readers see the old file or the whole new one
        else:
            os.remove(self.tmp)
            if exc_type is None:
                raise ValueError(f"tensor file {self.path}: never written: {self._order}")
