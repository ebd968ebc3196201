"""One naming of model variables, used by plans, explain, export and checkpoints.

A variable is named by its attribute path joined with ``.`` (list items by index):
``layers.0.attention.wq.kernel``. Trees that hold ``nnx.State`` inside other containers
(the trainer's ``{"params": ..., "opt_state": ...}``) get the container keys in front:
``params.layers.0.attention.wq.kernel``, ``opt_state.0.mu.layers.0.attention.wq.kernel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx


def path_str(path: Sequence[Any]) -> str:
    """``("blocks", 0, "mlp")`` -> ``"blocks.0.mlp"``."""
    return ".".join(str(p) for p in path)


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def leaf_names(tree: Any) -> list[str]:
    """The names of ``jax.tree.leaves(tree)``, in that order.

    An ``nnx.Variable`` is named for itself (``w1.kernel``), not for its inner ``value``
    node, so a parameter has the same name in a model, its state and a checkpoint.
    """
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    names = []
    for path, node in flat:
        name = path_str(_key(e) for e in path)
        n_leaves = len(jax.tree.leaves(node)) if isinstance(node, nnx.Variable) else 1
        names += [name] if n_leaves == 1 else [f"{name}.{i}" for i in range(n_leaves)]
    return names
