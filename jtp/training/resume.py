"""What a training checkpoint holds besides the arrays, and how a fit resumes from one."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import jax

from jtp.checkpoint.sharded import Checkpointer
from jtp.mesh import mesh_shape

if TYPE_CHECKING:
    from jtp.training.trainer import Trainer


def _jtp_version() -> str:
    try:
        return version("jtp")
    except PackageNotFoundError:
        return "unknown"


def save_train_state(
    ckpt: Checkpointer, trainer: Trainer, loader: Any, *, only_if_new: bool = False
) -> None:
    """Start an async save of the state after ``trainer.global_step`` optimizer steps.

    Called only at optimizer-step boundaries (every step is one: accumulation happens inside
    the compiled step), so the loader position saved is the first batch of the next step.
    """
    if only_if_new and trainer.global_step in ckpt.all_steps():
        return
    loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
    module = trainer._module
    meta = {
        "step": trainer.global_step,
        "epoch": loader_state["epoch"] if loader_state else trainer.current_epoch,
        "loader": loader_state,
        "mesh": mesh_shape(trainer.mesh),
        "fsdp": trainer.strategy.fsdp,
        "precision": trainer.options.precision,
        "accumulate_grad_batches": trainer.options.accumulate_grad_batches,
        "jtp_version": _jtp_version(),
        "module": module.checkpoint_metadata() if module else {},
    }
    ckpt.save(trainer.global_step, trainer._state.tree(), meta)


def restore_train_state(ckpt: Checkpointer, trainer: Trainer, loader: Any) -> dict[str, Any]:
    """Restore the newest step every process can read into ``trainer``'s state (resharded
    onto its mesh); position ``loader``; return the checkpoint's metadata."""
    state = trainer._state
    tree, meta, step = ckpt.restore(state.tree())
    state.update(tree["params"], tree["opt_state"], tree["rest"])
    if meta.get("loader") and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(meta["loader"])
    if jax.process_index() == 0:
        print(
            f"resumed from step {step} (epoch {meta['epoch']}) saved on mesh "
            f"{meta.get('mesh')}, fsdp={meta.get('fsdp')}; now {mesh_shape(trainer.mesh)}, "
            f"fsdp={trainer.strategy.fsdp}",
            file=sys.stderr,
        )
    return meta
