"""What a training checkpoint holds besides the arrays, and how a fit resumes from one."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jax
from jax.sharding import Mesh

from jtp.checkpoint.sharded import Checkpointer
from jtp.mesh import mesh_shape


def _jtp_version() -> str:
    try:
        return version("jtp")
    except PackageNotFoundError:
        return "unknown"


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
