"""Sharded, asynchronous, atomic checkpoints (orbax) that restore onto any mesh.

Each process writes only its own shards; orbax commits a step by renaming a finished
temporary directory, so a step is complete or absent, never half visible (a killed save
leaves only a temporary directory, which is ignored). Restoring takes *abstract* targets
(``jax.ShapeDtypeStruct`` with the new run's shardings), so a checkpoint written on a
(2, 4) mesh with fsdp restores onto (1, 8) without it: the arrays are resharded on read.

The training state is stored as a flat ``{"params.w1.kernel": array, ...}`` dict, so
it is independent of pytree node types; a small JSON record beside it holds the step, the
epoch, the loader position, the mesh, the plan and the jtp version. A model's layers restore
across their two layouts, unrolled and stacked for a scan (:mod:`jtp.checkpoint.conversion`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jtp.checkpoint.conversion import Read, assemble, plan_read, source_targets
from jtp.checkpoint.manifest import damage, has_manifest, write_manifest
from jtp.distributed import agree_min
from jtp.parallel.abstract import abstract_array, abstract_tree
from jtp.parallel.names import leaf_names
from jtp.parallel.stacked import layer_names

log = logging.getLogger("jtp.checkpoint.sharded")

# What an unreadable checkpoint raises (missing or truncated files, bad JSON, a tensorstore
# read error): only these mean "damaged, try an older step". Anything else propagates.
DAMAGED = (OSError, ValueError, KeyError)

_KEY_SUFFIX = "#key_data"  # typed PRNG keys are stored as their raw uint32 data


_LEGACY = ".value"  # checkpoints before jtp 0.2 named a Variable's leaf "<path>.value"


def flatten_state(tree: Any) -> dict[str, Any]:
    """``{name: leaf}`` under jtp's one variable naming (:func:`jtp.parallel.names.leaf_names`:
    ``params.w1.kernel``); typed PRNG keys become their ``key_data``."""
    flat = {}
    for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree), strict=True):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            flat[name + _KEY_SUFFIX] = _key_data(leaf)
        else:
            flat[name] = leaf
    return flat


def _key_data(leaf: Any) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return abstract_array(jax.eval_shape(jax.random.key_data, leaf), leaf.sharding)
    return jax.random.key_data(leaf)


def unflatten_state(flat: dict[str, Any], like: Any) -> Any:
    """Inverse of :func:`flatten_state`, shaped like the pytree ``like``."""
    leaves = []
    for name, leaf in zip(leaf_names(like), jax.tree.leaves(like), strict=True):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            leaves.append(jax.random.wrap_key_data(flat[name + _KEY_SUFFIX], impl=impl))
        else:
            leaves.append(flat[name])
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _legacy_name(name: str) -> str:
    """The name an older checkpoint gave ``name``: ``params.w1.kernel`` ->
    ``params.w1.kernel.value`` (``...#key_data`` -> ``....value#key_data``)."""
    if name.endswith(_KEY_SUFFIX):
        return name.removesuffix(_KEY_SUFFIX) + _LEGACY + _KEY_SUFFIX
    return name + _LEGACY


def _layers_hint(name: str, shape: tuple[int, ...], saved: Any) -> str:
    """Why a stacked entry was not found when the checkpoint holds some of its layers."""
    if shape and layer_names(name, 1, saved):
        return (
            f" (it holds unrolled layers of it, but not all {shape[0]} the model stacks: "
            "written with another n_layers?)"
        )
    return ""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model (missing entry or other shape)."""


class Checkpointer:
    """Save and restore training state under ``directory/<step>``, keeping the last few.

    Args:
      directory: a shared path every process can reach.
      keep_last: how many complete checkpoints to keep.
      async_save: write in the background (the device-to-host copy happens before
        ``save`` returns, so the caller may overwrite or donate the arrays at once).
    """

    def __init__(self, directory: str, *, keep_last: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._unlisted: list[int] = []  # saved steps whose manifest is not written yet

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing ``state`` (a pytree of global arrays) and ``meta`` (JSON)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flatten_state(state)),
            meta=ocp.args.JsonSave(meta),
        )
        self._list_committed()  # the previous save is committed before this one starts
        self._manager.save(step, args=args, force=True)
        self._unlisted.append(step)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _list_committed(self) -> None:
        """Wait for the saves in flight (every process, at the same point), then process 0
        writes the manifest of each (:mod:`jtp.checkpoint.manifest`)."""
        if not self._unlisted:
            return
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unlisted:
                if os.path.isdir(self._step_dir(step)):  # not already deleted by keep_last
                    write_manifest(self._step_dir(step))
        self._unlisted = []

    def meta(self, step: int | None = None) -> tuple[dict[str, Any], int]:
        """The JSON record saved with ``step`` (default: the newest) and that step, no array
        read: what a program needs to rebuild the model before restoring it."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint step {step} in {self.directory} (steps there: "
                f"{self.all_steps() or 'none'})"
            )
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"]), step

    def wait(self) -> None:
        """Block until every started save is committed and listed in its manifest."""
        self._manager.wait_until_finished()
        self._list_committed()

    def _state_metadata(self, step: int) -> Any:
        """The saved arrays' metadata of ``step``; a ``DAMAGED`` error if unreadable."""
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:  # orbax reads an emptied item as "no metadata": damaged
            raise FileNotFoundError(f"checkpoint step {step} has no readable state metadata")
        return saved

    def _reads(self, step: int, target: dict[str, Any]) -> dict[str, Read]:
        """Where each target entry is in the checkpoint (:mod:`jtp.checkpoint.conversion`:
        under its name, or across unrolled and stacked layers); older checkpoints spelled
        a variable ``params.w1.kernel.value``, and still restore."""
        saved = self._state_metadata(step)
        legacy = not any(n in saved for n in target) and any(
            _legacy_name(n) in saved for n in target
        )
        reads = {
            n: plan_read(_legacy_name(n) if legacy else n, tuple(a.shape), saved)
            for n, a in target.items()
        }
        self._check_shapes(step, target, reads, saved)
        return reads

    def _check_shapes(
        self, step: int, target: dict[str, Any], reads: dict[str, Read], saved: Any
    ) -> None:
        # Parameters first: the error should name a parameter, not its Adam moment.
        for name in sorted(target, key=lambda n: (not n.startswith("params."), n)):
            want, read = tuple(target[name].shape), reads[name]
            for source in read.sources:
                if source not in saved:
                    raise CheckpointMismatchError(
                        f"checkpoint step {step} in {self.directory} has no entry for "
                        f"{source!r}{_layers_hint(source, want, saved)}; it was written by a "
                        "different model or optimizer"
                    )
                shape = tuple(saved[source].shape)
                expect = want[1:] if read.stacks else want
                got = shape[1:] if read.layer is not None else shape
                if got != expect or (read.layer is not None and read.layer >= shape[0]):
                    raise CheckpointMismatchError(
                        f"checkpoint step {step}: parameter {source!r} has shape {shape} but "
                        f"the model expects {expect if read.stacks else want}"
                        f"{' (one layer of ' + repr(name) + ')' if read.stacks else ''}; the "
                        "checkpoint is for another model configuration"
                    )

    def _readable(self, step: int) -> bool:
        """This process finds its share of the step's files as the manifest lists them, and
        can read the step's metadata (a damaged, missing or truncated file: False)."""
        step_dir = self._step_dir(step)
        if has_manifest(step_dir):  # first: it names the file, where a read names a store
            problem = damage(step_dir, (jax.process_index(), jax.process_count()))
            if problem:
                log.warning("checkpoint step %s is damaged: %s; skipping it", step, problem)
                return False
        else:
            log.warning("checkpoint step %s has no manifest: restored unverified", step)
        try:
            self._state_metadata(step)
            return True
        except DAMAGED as err:
            log.warning("checkpoint step %s is unreadable here (%s)", step, err)
            return False

    def _agreed_step(self, candidates: list[int]) -> int | None:
        """The newest of ``candidates`` that every process can read (None: none is).

        Processes may see different damage (a transient read error on one host): each
        proposes its newest readable step at or below a bound, all take the smallest
        proposal, and keep it only if every process can read it; else the bound drops
        below it. Every process runs the same rounds, so all return the same step.
        """
        readable: dict[int, bool] = {}  # checked lazily: verifying a step reads its files

        def ok(s: int) -> bool:
            if s not in readable:
                readable[s] = self._readable(s)
            return readable[s]

        newest_first, bound = sorted(candidates, reverse=True), max(candidates, default=-1)
        while bound >= 0:
            mine = next((s for s in newest_first if s <= bound and ok(s)), -1)
            step = agree_min(mine)
            if step < 0 or agree_min(int(ok(step))) == 1:
                return step if step >= 0 else None
            bound = step - 1
        return None

    def restore(
        self, like: Any, step: int | None = None, *, partial: bool = False
    ) -> tuple[Any, dict[str, Any], int]:
        """Restore onto the layout of ``like`` (arrays or ShapeDtypeStructs with shardings).

        ``partial``: the checkpoint may hold entries ``like`` lacks (an optimizer state that
        an evaluation never needs); they are not read. Otherwise it must hold exactly
        ``like``'s.

        Without ``step``: the newest checkpoint that every process can read; a damaged one
        (unreadable metadata or array files) is skipped, with a warning, for the next older
        one, and all processes skip it together. Shapes that do not fit ``like`` are a
        ``CheckpointMismatchError`` naming the parameter (no fallback: that is a wrong
        model, not a damaged file). Every process must call it.
        """
        target = abstract_tree(flatten_state(like))
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        skipped: list[int] = []
        while (s := self._agreed_step(candidates)) is not None:
            try:
                reads = self._reads(s, target)
                saved_target = source_targets(reads, target, self._state_metadata(s))
                state, meta = self._read(s, saved_target, partial=partial)
                ok = 1
            except CheckpointMismatchError:
                raise  # the wrong model, not a damaged file: no fallback
            except DAMAGED as err:
                log.warning("checkpoint step %s is damaged (%s); trying an older one", s, err)
                ok = 0
            if agree_min(ok) == 1:
                if skipped or s != max(candidates):
                    log.warning("restored step %s; newer step(s) were unreadable", s)
                flat = assemble(reads, state, target)
                return unflatten_state(flat, like), meta, s
            skipped.append(s)
            candidates = [c for c in candidates if c < s]
        tried = sorted(set(self.all_steps()) | set(skipped), reverse=True)
        raise FileNotFoundError(
            f"no checkpoint in {self.directory} that every process can read (tried steps "
            f"{tried or 'none: the directory holds no complete checkpoint'}); check that every "
            "host sees the same directory, or start without resume"
        )

    def _read(
        self, step: int, target: dict[str, Any], *, partial: bool
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The entries ``target`` names (``{saved name: abstract array}``) of ``step``, and
        its JSON record."""
        if not partial:
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            )
            out = self._manager.restore(step, args=args)
            return dict(out["state"]), dict(out["meta"])
        # The standard handler that wrote the state restores all of it or nothing; the
        # PyTree handler under it reads a subset of the same files. Step directories are
        # named by the bare step number (no step_prefix in the manager's options).
        path = os.path.join(self.directory, str(step), "state")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            state = reader.restore(path, args=args)
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(state), dict(meta["meta"])

    def close(self) -> None:
        self.wait()
        self._manager.close()
