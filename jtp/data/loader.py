"""A data loader whose batches are the same on every device of a tensor-parallel group.

Tensor parallelism computes ONE forward pass with a group of devices, so every device of the
group must see the same rows; data-parallel groups must see disjoint rows. Lightning's docs
example gets this wrong silently unless every process is seeded alike. Here what a device
sees is a pure function of (seed, epoch, batch index, its data-parallel rank):

- the epoch order is ``permutation(seed, epoch)``, the same in every process;
- global batch b is ``order[b*B:(b+1)*B]``; data rank r holds its r-th slice of B/d rows;
- a process reads only the rows of the data ranks its own devices belong to, derived from
  the mesh (never from the process index alone: a tensor group may span processes).

On a mesh with an expert axis the data ranks are the (data, expert) pairs, data major
(rank ``i * expert + j``): outside the MoE layers "expert" splits the batch as "data" does.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jtp.errors import InputError
from jtp.mesh import batch_axes_text, batch_grid, batch_ranks
from jtp.parallel.batch import batch_sharding


class MapDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


def default_collate(samples: Sequence[Any]) -> Any:
    """Stack samples (arrays or pytrees of arrays) along a new leading batch axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *samples)


def local_data_ranks(device_grid: np.ndarray, process_index: int) -> list[int]:
    """Data-parallel ranks (mesh rows) that hold at least one device of ``process_index``.

    ``device_grid`` is ``mesh.devices`` as ``(data rank, tensor)``
    (:func:`jtp.mesh.batch_grid`). With mesh (1, 8) over two processes of 4 devices, both
    own rank 0 and read the same rows; with (2, 4), process p owns rank p; with (4, 2), each
    owns two ranks.
    """
    rows = {r for (r, _), d in np.ndenumerate(device_grid) if d.process_index == process_index}
    return sorted(rows)


def check_map_dataset(dataset: Any) -> int:
    """``len(dataset)`` after checking that ``dataset`` is map-style and finite.

    Random access is what lets each process read only its data ranks' rows, and a finite
    length is what epochs and the shuffle are made of. A ``grain.MapDataset`` is map-style;
    grain's ``IterDataset`` (after ``.to_iter_dataset()``) and ``.repeat()`` are not.
    """
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise InputError(
            f"DataLoader: {type(dataset).__name__} is not a map-style dataset (len(dataset) "
            "and dataset[i]), which each process needs to read only its data ranks' rows; "
            "with grain, pass the grain.MapDataset itself, not .to_iter_dataset()"
        )
    n = len(dataset)
    if n >= sys.maxsize:
        raise InputError(
            f"DataLoader: {type(dataset).__name__} is infinite (grain's .repeat()?); the "
            "loader makes the epochs itself: drop .repeat() and set max_epochs"
        )
    return n


class DataLoader:
    """Global, sharded batches from a map-style dataset.

    Args:
      dataset: ``len(dataset)`` and ``dataset[i]`` -> array or pytree of arrays; e.g. a
        :class:`jtp.TokenDataset` or a ``grain.MapDataset`` (whose per-index randomness
        and ``.shuffle(seed)`` are pure functions of the index: every process agrees).
      batch_size: the GLOBAL batch; each data rank gets ``batch_size / data`` rows.
      mesh: the ``("data", "tensor")`` mesh; batches are sharded ``P("data", ...)``.
      shuffle: permute each epoch with ``(seed, epoch)``; otherwise dataset order.
      seed: the order's seed (independent of any global RNG).
      drop_last: drop the tail that does not fill a global batch. With ``False`` the last
        batch is completed by wrapping around to the epoch's first samples (as torch's
        ``DistributedSampler`` pads), so every batch keeps the compiled step's shape.
      prefetch: batches prepared ahead by a background thread (0: load inline).
      collate: samples -> batch (default: stack along a new axis).
    """

    def __init__(
        self,
        dataset: MapDataset,
        batch_size: int,
        *,
        mesh: Mesh,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        prefetch: int = 2,
        collate: Callable[[Sequence[Any]], Any] | None = None,
    ):
        n_data = batch_ranks(mesh)
        n = check_map_dataset(dataset)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"DataLoader: batch_size={batch_size!r} must be a positive int")
        if batch_size % n_data:
            raise InputError(
                f"DataLoader: global batch_size={batch_size} is not divisible by "
                f"{batch_axes_text(mesh)} of size {n_data}; use a multiple of {n_data}"
            )
        if n < batch_size and drop_last:
            raise InputError(
                f"DataLoader: dataset has {n} samples, fewer than one batch of "
                f"{batch_size}; lower batch_size or pass drop_last=False"
            )
        if n == 0:
            raise InputError("DataLoader: dataset is empty")
        self.dataset, self.batch_size, self.mesh = dataset, batch_size, mesh
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.prefetch = prefetch
        self.collate = collate or default_collate
        self.epoch = 0
        self._start_batch = 0  # set by load_state_dict: resume inside an epoch
        self._position = 0  # batches of the current epoch handed to the consumer
        self.rows_per_rank = batch_size // n_data
        self.local_ranks = local_data_ranks(batch_grid(mesh), jax.process_index())

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses (as torch's samplers)."""
        if epoch != self.epoch:
            self._start_batch = 0
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of one epoch: a pure function of (seed, epoch)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """The global batch ``batch`` of ``epoch``: ``batch_size`` sample indices."""
        order = self.order(epoch)
        idx = np.arange(batch * self.batch_size, (batch + 1) * self.batch_size)
        return order[idx % len(order)]  # wraps only for the last batch with drop_last=False

    def unique_rows(self, batch: int) -> int:
        """Rows of global batch ``batch`` that are not wrap-around repeats: ``batch_size``
        except for the last batch of an epoch with ``drop_last=False``."""
        return max(0, min(self.batch_size, len(self.dataset) - batch * self.batch_size))

    def padded_batches(self, epoch: int, batch: int) -> tuple[Any, Any]:
        """Two global batches that let a mean over the unique rows be recovered from batch
        means, for any loss that is a mean of per-row terms: ``(U + [u] * (B - r), [u] * B)``
        where U are the r unique rows of ``batch`` and u its first row. Then
        ``mean(U) = (B * mean(first) - (B - r) * mean(second)) / r``."""
        r, b = self.unique_rows(batch), self.batch_size
        unique = self.batch_indices(epoch, batch)[:r]
        first = np.concatenate([unique, np.repeat(unique[:1], b - r)])
        return self._load_indices(first), self._load_indices(np.repeat(unique[:1], b))

    def _load(self, epoch: int, batch: int) -> Any:
        return self._load_indices(self.batch_indices(epoch, batch))

    def _load_indices(self, indices: np.ndarray) -> Any:
        """Read this process's rows of one global batch (``batch_size`` sample indices)
        and assemble the global jax.Array(s)."""
        r = self.rows_per_rank
        local = {
            rank: self.collate([self._sample(int(i)) for i in indices[rank * r : (rank + 1) * r]])
            for rank in self.local_ranks
        }
        template = next(iter(local.values()))
        treedef = jax.tree.structure(template)
        per_rank = {rank: jax.tree.leaves(tree) for rank, tree in local.items()}
        leaves = []
        for j, leaf in enumerate(jax.tree.leaves(template)):
            shape = (self.batch_size, *np.shape(leaf)[1:])
            sharding = batch_sharding(self.mesh, len(shape))

            def rows(index: tuple[slice, ...], j: int = j) -> np.ndarray:
                # index[0] is one data rank's block of rows (same for its whole tensor group)
                rank = (index[0].start or 0) // r
                return per_rank[rank][j][(slice(None), *index[1:])]

            leaves.append(jax.make_array_from_callback(shape, sharding, rows))
        return jax.tree.unflatten(treedef, leaves)

    def _sample(self, index: int) -> Any:
        sample = self.dataset[index]
        if sample is None:
            raise InputError(
                f"DataLoader: dataset[{index}] is None (grain's MapDataset.filter leaves such "
                "holes); every index must hold a sample: filter the records before the "
                "MapDataset is built"
            )
        return sample

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.epoch, self._start_batch
        self._start_batch = 0
        self._position = start
        batches = range(start, len(self))
        if self.prefetch <= 0:
            for b in batches:
                out = self._load(epoch, b)
                self._position = b + 1
                yield out
            return
        yield from self._prefetched(epoch, batches)

    def _prefetched(self, epoch: int, batches: range) -> Iterator[Any]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            """Hand over ``item`` unless the consumer has gone; never blocks for good."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for b in batches:
                    if not put((b, self._load(epoch, b))):
                        return
                put((None, done))
            except BaseException as err:  # re-raised in the consumer
                put((None, err))

        thread = threading.Thread(target=work, name="jtp-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                b, item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._position = b + 1
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)

    def state_dict(self) -> dict[str, int]:
        """Where the consumer is: resume with :meth:`load_state_dict` on a new loader."""
        epoch, position = self.epoch, self._position
        if position >= len(self):
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "batch": position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue with exactly the batches the uninterrupted run would yield next."""
        if state.get("seed", self.seed) != self.seed:
            raise InputError(
                f"DataLoader.load_state_dict: saved seed {state['seed']} != loader seed "
                f"{self.seed}; the order would differ"
            )
        self.epoch = int(state["epoch"])
        self._start_batch = self._position = int(state["batch"])
