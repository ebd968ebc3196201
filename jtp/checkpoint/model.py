"""A trained model out of a training checkpoint, without its optimizer state, on any mesh.

A training checkpoint (:class:`jtp.checkpoint.sharded.Checkpointer`, written by ``fit``)
holds ``params.*``, ``opt_state.*`` and ``rest.*``. Evaluating or exporting the model needs
only the first and the last: restoring onto an abstract model (``nnx.eval_shape`` with the
plan's shardings, :func:`jtp.parallel.abstract.abstract_sharded`) reads each device's
slices of those and never the optimizer's moments (twice the parameters under Adam).
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from jtp.checkpoint.sharded import Checkpointer


def open_checkpoints(directory: str) -> Checkpointer:
    """A :class:`Checkpointer` on an existing directory (orbax would create a missing one,
    and a typo would then read as "no checkpoint")."""
    if not os.path.isdir(directory):
        raise ValueError(
            f"--checkpoint {directory}: no such directory (python -m jtp.train "
            "--checkpoint-dir DIR writes one)"
        )
    return Checkpointer(directory, async_save=False)


def restore_model[M: nnx.Module](
    directory: str, abstract: M, *, step: int | None = None
) -> tuple[M, dict[str, Any], int]:
    """The model of checkpoint ``step`` (default: the newest every process can read) laid
    out as ``abstract`` says; and the step's metadata and number.

    ``abstract``'s variables are ``jax.ShapeDtypeStruct``s carrying the target shardings:
    the checkpoint's mesh, fsdp and layer layout (unrolled or scanned) may differ from them,
    as on resume. The parameters come back in ``abstract``'s dtypes. A checkpoint of another
    model is a ``CheckpointMismatchError`` naming the parameter.
    """
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    ckpt = open_checkpoints(directory)
    try:
        tree, meta, step = ckpt.restore({"params": params, "rest": rest}, step=step, partial=True)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, tree["params"], tree["rest"]), meta, step


def llama_record(
    directory: str, step: int | None, program: str
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The training module's record (``{"model": "Llama", "config": ..., "model_config":
    ...}``), the whole metadata and the step number of checkpoint ``step`` (default the
    newest), read from its JSON alone; a ``ValueError`` when it holds no Llama-family model
    (``program`` names what refuses it, e.g. "jtp.eval scores")."""
    ckpt = open_checkpoints(directory)
    try:
        meta, step = ckpt.meta(step)
    finally:
        ckpt.close()
    module = meta.get("module") or {}
    if module.get("model") != "Llama":
        raise ValueError(
            f"--checkpoint {directory}: step {step} holds a {module.get('model')}, not a "
            f"language model; {program} Llama-family checkpoints (--model llama)"
        )
    return module, meta, step
