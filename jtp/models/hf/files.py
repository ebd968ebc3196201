"""Safetensors files of an HF checkpoint: find a tensor, read a block of it, write a shard.

Reading goes through ``safetensors.safe_open(...).get_slice``: the header is parsed, the file
is memory-mapped, and only the bytes of the requested block are copied out. Each read opens
and closes the file, so the mapped pages of one tensor at a time count against the process.

Writing is streamed: the header is computed from shapes and dtypes before any tensor exists,
then the tensors are appended one by one, so a writer holds one whole tensor at a time (the
``safetensors`` package's ``save_file`` needs every tensor of a file in memory at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from jtp.checkpoint.outputs import (
    check_output_dir,
    checked_on_process_0,
    move_into_place,
    write_marker,
)
from jtp.checkpoint.tensor_file import TensorFileWriter
from jtp.distributed import same_programs_on_every_process, watching
from jtp.errors import InputError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointFiles:
    """The tensors of an HF checkpoint directory: one ``model.safetensors``, or shards listed
    by ``model.safetensors.index.json``. Only headers are read here."""

    def __init__(self, path: str, single: str = SINGLE):
        """``single``: the one-file name (a PEFT adapter's is ``adapter_model.safetensors``)."""
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index) and single == SINGLE:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, single)):
            files = [single]
        else:
            raise ValueError(
                f"{path}: neither {single} nor {INDEX} (jtp.hf reads safetensors checkpoints "
                "only; convert *.bin with transformers' save_pretrained(safe_serialization=True))"
            )
        self.file_of: dict[str, str] = {}  # tensor name -> file path
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise ValueError(f"{path}: {INDEX} lists {name}, which is missing")
            try:
                with safe_open(file, framework="numpy") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self.file_of[key] = file
                        self.shape[key] = tuple(s.get_shape())
                        self.dtype[key] = s.get_dtype()
            except SafetensorError as err:  # a truncated or damaged file: name it
                raise InputError(f"{file} is not a readable safetensors file ({err})") from None

    def reader(self, name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
        """``read(index)``: that block of tensor ``name``, copied out of its file."""
        file = self.file_of[name]

        def read(index: tuple[slice, ...]) -> np.ndarray:
            with safe_open(file, framework="numpy") as f:
                return f.get_slice(name)[index]

        return read


def write_safetensors(
    file: str,
    entries: list[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
) -> None:
    """Write a safetensors file whose tensors ``(name, dtype, shape)`` are ``produce(name)``,
    called once each, in order; only one of them is referenced here at a time."""
    specs = [(name, tuple(shape), dtype) for name, dtype, shape in entries]
    with TensorFileWriter(file, specs, metadata={"format": "pt"}) as writer:
        for name, _, _ in entries:
            writer.write(name, produce(name))


@contextlib.contextmanager
def staged_directory(
    path: str, name: str, kind: str, inputs: Iterable[tuple[str, str | None]] = ()
) -> Iterator[str | None]:
    """A directory written whole or not at all, by process 0, while every process takes part.

    First, before any work, process 0 checks that ``path`` may be written as an artefact of
    ``kind`` (:func:`jtp.checkpoint.outputs.check_output_dir`: absent, empty or a previous
    one of the same kind, and none of ``inputs``); all processes agree, so all raise or none.
    Process 0 then gets a fresh temporary directory beside ``path`` to write into, marked
    with ``kind`` (the others get None and only take part in the gathers); on success it
    replaces ``path`` (:func:`jtp.checkpoint.outputs.move_into_place`), on an error it is
    removed and ``path`` is left as it was. Then every process waits for the others
    (``name`` labels the barrier), so none reads ``path`` before it is complete.
    """
    same_programs_on_every_process()  # the barrier below is a program of every process
    writer = jax.process_index() == 0
    flag = f"{name}: path"
    checked_on_process_0(
        lambda: check_output_dir(path, kind, flag=flag, inputs=inputs, parents=True), path, name
    )
    tmp = f"{os.path.abspath(path).rstrip('/')}.tmp-{os.getpid()}"
    try:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            write_marker(tmp, kind)
        yield tmp if writer else None
        if writer:
            move_into_place(tmp, path)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        with watching(f"the barrier after {name} (every process waits for the others)"):
            multihost_utils.sync_global_devices(name)
