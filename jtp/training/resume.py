"""What a training checkpoint holds besides the arrays, and how a fit resumes from one."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jax
from jax.sharding import Mesh

from jtp.checkpoint.sharded import Checkpointer
from jtp.errors import InputError
from jtp.mesh import mesh_shape


def _jtp_version() -> str:
    try:
        return version("jtp")
    except PackageNotFoundError:
        return "unknown"


def open_checkpoints(
    directory: str | None, resume: bool | str, *, keep_last: int
) -> Checkpointer | None:
    """A fit's checkpoints, after checking ``resume`` against what ``directory`` holds (the
    same in every process: it is shared); None without a directory.

    ``resume=True``: the directory must exist (a misspelt one is an error, not a fresh
    start); one without a checkpoint yet starts at step 0, saying so. ``"if-any"``: a
    missing directory too (a job that restarts itself). ``False``: a directory that holds
    checkpoints is refused; they belong to an earlier run, whose steps this one would mix
    with. Each refusal is an :class:`jtp.errors.InputError` naming the flag to use.
    """
    if resume not in (False, True, "if-any"):
        raise ValueError(f"fit(resume={resume!r}): resume is False, True or 'if-any'")
    if resume and not directory:
        raise InputError("fit(resume=True) needs Trainer(checkpoint_dir=...) to resume from")
    if not directory:
        return None
    if resume is True and not os.path.isdir(directory):
        raise InputError(
            f"--resume: checkpoint directory {directory} does not exist (misspelt?); for a "
            "job that starts there and resumes after a restart, pass --resume if-any "
            "(fit(resume='if-any'))"
        )
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f"--checkpoint-dir {directory} is a file, not a directory")
    ckpt = Checkpointer(directory, keep_last=keep_last)
    steps = ckpt.all_steps()
    if steps and not resume:
        shown = ", ".join(map(str, steps[-5:]))
        raise InputError(
            f"--checkpoint-dir {directory} holds checkpoints of an earlier run (steps "
            f"{shown}): pass --resume (fit(resume=True)) to continue it, or another "
            "--checkpoint-dir to start afresh; nothing was written"
        )
    if resume and not steps and jax.process_index() == 0:
        print(f"no checkpoint in {directory} yet: starting at step 0")
    return ckpt


def save_train_state(
    ckpt: Checkpointer,
    tree: Mapping[str, Any],
    loader: Any,
    *,
    step: int,
    epoch: int,
    facts: Mapping[str, Any],
    only_if_new: bool = False,
) -> None:
    """Start an async save of ``tree`` (the state after ``step`` optimizer steps), with the
    loader's position and the run's ``facts`` (mesh, precision, ...) in the metadata.

    Called only at optimizer-step boundaries (every step is one: accumulation happens inside
    the compiled step), so the loader position saved is the first batch of the next step.
    """
    if only_if_new and step in ckpt.all_steps():
        return
    loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
    meta = {
        "step": step,
        "epoch": loader_state["epoch"] if loader_state else epoch,
        "loader": loader_state,
        **facts,
        "jtp_version": _jtp_version(),
    }
    ckpt.save(step, dict(tree), meta)


def restore_train_state(
    ckpt: Checkpointer, target: Mapping[str, Any], loader: Any, *, mesh: Mesh, fsdp: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The newest step every process can read, resharded like ``target`` (arrays or
    abstract arrays on ``mesh``), and its metadata; ``loader`` is positioned where it was."""
    tree, meta, step = ckpt.restore(dict(target))
    if meta.get("loader") and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(meta["loader"])
    if jax.process_index() == 0:
        print(
            f"resumed from step {step} (epoch {meta['epoch']}) saved on mesh "
            f"{meta.get('mesh')}, fsdp={meta.get('fsdp')}; now {mesh_shape(mesh)}, "
            f"fsdp={fsdp}",
            file=sys.stderr,
        )
    return tree, meta
