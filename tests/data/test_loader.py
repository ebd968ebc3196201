"""The loader's contract: same rows within a tensor group, disjoint across data ranks, each
sample once per epoch, a pure function of (seed, epoch), resumable mid-epoch."""

import threading

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jtp
from jtp.data.loader import local_data_ranks


class Indexed:
    """Sample i is the vector [i, i, i, i]: rows identify their sample."""

    def __init__(self, n: int = 64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full(4, i, np.float32), "y": np.int32(i)}


def _rows_by_device(arr, mesh):
    """{(data rank, tensor rank): sample ids} from each device's shard."""
    pos = {
        d.id: tuple(int(c) for c in np.argwhere(mesh.devices == d)[0]) for d in mesh.devices.flat
    }
    return {
        pos[s.device.id]: tuple(np.asarray(s.data)[:, 0].astype(int))
        for s in arr.addressable_shards
    }


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (1, 8)])
def test_tensor_groups_identical_data_disjoint_epoch_complete(shape):
    mesh = jtp.make_mesh(*shape)
    loader = jtp.DataLoader(Indexed(64), 8, mesh=mesh, shuffle=True, seed=3)
    assert len(loader) == 8
    seen = []
    for batch in loader:
        assert batch["x"].sharding.spec == P("data", None)
        assert batch["y"].sharding.spec == P("data")
        rows = _rows_by_device(batch["x"], mesh)
        for d in range(shape[0]):
            group = {rows[(d, t)] for t in range(shape[1])}
            assert len(group) == 1, f"tensor group {d} saw different rows: {group}"
        per_rank = [set(rows[(d, 0)]) for d in range(shape[0])]
        for a in range(shape[0]):
            for b in range(a + 1, shape[0]):
                assert not per_rank[a] & per_rank[b]
        seen.extend(np.asarray(batch["y"]).tolist())
    assert sorted(seen) == list(range(64))  # every sample exactly once


def test_order_is_pure_function_of_seed_and_epoch():
    mesh = jtp.make_mesh(2, 4)

    def epoch_ids(seed, epoch):
        loader = jtp.DataLoader(Indexed(32), 8, mesh=mesh, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return [np.asarray(b["y"]).tolist() for b in loader]

    np.random.seed(123)  # global RNG state must not matter
    a = epoch_ids(0, 1)
    np.random.seed(999)
    assert epoch_ids(0, 1) == a
    assert epoch_ids(0, 2) != a
    assert epoch_ids(1, 1) != a


def test_resume_mid_epoch_matches_uninterrupted():
    mesh = jtp.make_mesh(4, 2)
    full = jtp.DataLoader(Indexed(64), 8, mesh=mesh, shuffle=True, seed=5)
    full.set_epoch(2)
    expected = [np.asarray(b["y"]).tolist() for b in full]

    first = jtp.DataLoader(Indexed(64), 8, mesh=mesh, shuffle=True, seed=5, prefetch=3)
    first.set_epoch(2)
    got = []
    for i, b in enumerate(first):
        got.append(np.asarray(b["y"]).tolist())
        if i == 2:
            break  # the prefetch thread is ahead; the position must not be
    state = first.state_dict()
    assert state == {"epoch": 2, "batch": 3, "seed": 5}

    resumed = jtp.DataLoader(Indexed(64), 8, mesh=mesh, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    got += [np.asarray(b["y"]).tolist() for b in resumed]
    assert got == expected
    assert resumed.state_dict() == {"epoch": 3, "batch": 0, "seed": 5}


def test_drop_last_false_wraps_to_fill_the_last_batch():
    loader = jtp.DataLoader(Indexed(20), 8, mesh=jtp.make_mesh(2, 4), drop_last=False)
    batches = [np.asarray(b["y"]).tolist() for b in loader]
    assert len(loader) == 3 and len(batches) == 3
    assert batches[-1] == [16, 17, 18, 19, 0, 1, 2, 3]


class Failing(Indexed):
    def __getitem__(self, i):
        if i == 20:
            raise KeyError("bad sample 20")
        return super().__getitem__(i)


def test_prefetch_errors_propagate_and_threads_stop():
    before = {t for t in threading.enumerate() if t.name == "jtp-prefetch"}
    loader = jtp.DataLoader(Failing(64), 8, mesh=jtp.make_mesh(2, 4))
    with pytest.raises(KeyError, match="bad sample 20"):
        for _ in loader:
            pass
    for _ in jtp.DataLoader(Indexed(64), 8, mesh=jtp.make_mesh(2, 4), prefetch=2):
        break  # early exit must stop the producer
    alive = {t for t in threading.enumerate() if t.name == "jtp-prefetch" and t.is_alive()}
    assert alive <= before


class FakeDevice:
    def __init__(self, process_index):
        self.process_index = process_index


def _grid(shape, devices_per_process=4):
    ids = np.arange(shape[0] * shape[1]).reshape(shape)
    return np.vectorize(lambda i: FakeDevice(i // devices_per_process), otypes=[object])(ids)


def test_local_data_ranks_from_mesh_positions():
    # (1, 8) over 2 processes: the tensor group spans both; both read rank 0's rows.
    assert local_data_ranks(_grid((1, 8)), 0) == [0]
    assert local_data_ranks(_grid((1, 8)), 1) == [0]
    assert local_data_ranks(_grid((2, 4)), 0) == [0]
    assert local_data_ranks(_grid((2, 4)), 1) == [1]
    assert local_data_ranks(_grid((4, 2)), 0) == [0, 1]
    assert local_data_ranks(_grid((4, 2)), 1) == [2, 3]
    # ("data", "expert", "tensor") = (2, 2, 2) seen as (batch rank, tensor) = (4, 2)
    # (jtp.mesh.batch_grid): rank d * 2 + x; process p holds ranks 2p and 2p + 1.
    grid = _grid((4, 2)).reshape(2, 2, 2).reshape(4, 2)
    assert local_data_ranks(grid, 0) == [0, 1] and local_data_ranks(grid, 1) == [2, 3]


def test_random_dataset_is_deterministic():
    a, b = jtp.RandomDataset(16, 8, seed=1), jtp.RandomDataset(16, 8, seed=1)
    np.random.seed(0)
    x = a[3]
    np.random.seed(1)
    np.testing.assert_array_equal(x, b[3])
    assert x.dtype == np.float32 and x.shape == (16,)
    assert not np.array_equal(a[3], a[4])
    with pytest.raises(IndexError):
        a[8]


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"batch_size": 6}, r"batch_size=6 is not divisible by mesh axis 'data' of size 4"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive int"),
        ({"batch_size": 128}, r"dataset has 64 samples, fewer than one batch of 128"),
    ],
)
def test_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        jtp.DataLoader(Indexed(64), mesh=jtp.make_mesh(4, 2), **kw)


def test_early_exit_does_not_wait_for_a_blocked_producer():
    """The producer may be parked on a full queue holding its end-of-epoch marker when the
    consumer stops (max_steps): closing must not wait for its 10 s join timeout."""
    import time

    loader = jtp.DataLoader(Indexed(24), 8, mesh=jtp.make_mesh(2, 4), prefetch=1)
    it = iter(loader)
    next(it)
    time.sleep(0.3)  # let the producer fill the queue and block on the marker
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 2.0
    assert not [t for t in threading.enumerate() if t.name == "jtp-prefetch" and t.is_alive()]


def test_load_state_dict_rejects_another_seed():
    loader = jtp.DataLoader(Indexed(64), 8, mesh=jtp.make_mesh(2, 4), shuffle=True, seed=1)
    with pytest.raises(ValueError, match="saved seed 2 != loader seed 1"):
        loader.load_state_dict({"epoch": 0, "batch": 3, "seed": 2})
