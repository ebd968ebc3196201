"""A user's Grain pipeline (``grain.MapDataset``) fed through jtp.DataLoader: the same
tensor-group guarantee as any map-style dataset, and clear refusals of what is not one."""

import grain
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_tokens import _tensor_groups_agree

import jtp


def pipeline(n: int = 64) -> grain.MapDataset:
    """Records -> shuffle (grain's own, seeded) -> a per-record random augmentation: every
    step a pure function of the index, so every process computes the same sample."""
    records = [{"id": i, "x": np.full(4, float(i), np.float32)} for i in range(n)]
    return (
        grain.MapDataset.source(records)
        .shuffle(seed=7)
        .random_map(
            lambda r, rng: {**r, "noise": rng.standard_normal(2).astype(np.float32)}, seed=1
        )
        .map(lambda r: {"x": r["x"], "noise": r["noise"], "y": np.int32(r["id"])})
    )


def test_grain_map_dataset_through_the_loader_on_2x4():
    mesh = jtp.make_mesh(2, 4)
    ds = pipeline()
    loader = jtp.DataLoader(ds, 8, mesh=mesh, shuffle=True, seed=3)
    plain = [ds[i] for i in range(len(ds))]  # the same samples as a plain list
    reference = jtp.DataLoader(plain, 8, mesh=jtp.make_mesh(1, 8), shuffle=True, seed=3)
    seen = []
    for batch, ref in zip(loader, reference, strict=True):
        assert batch["x"].sharding.spec == P("data", None)
        for key in ("x", "noise", "y"):
            _tensor_groups_agree(batch[key], mesh)
            np.testing.assert_array_equal(np.asarray(batch[key]), np.asarray(ref[key]))
        seen += np.asarray(batch["y"]).tolist()
    assert sorted(seen) == list(range(64))  # every record once per epoch


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: pipeline().to_iter_dataset(), r"not a map-style dataset .* not \.to_iter_dataset"),
        (lambda: pipeline().repeat(), r"is infinite \(grain's \.repeat\(\)\?\)"),
    ],
)
def test_what_is_not_a_finite_map_dataset_is_refused(make, msg):
    with pytest.raises(ValueError, match=msg):
        jtp.DataLoader(make(), 8, mesh=jtp.make_mesh(2, 4))


def test_a_filter_hole_is_named():
    holes = pipeline().filter(lambda r: r["y"] % 5 != 0)
    loader = jtp.DataLoader(holes, 8, mesh=jtp.make_mesh(2, 4), prefetch=0)
    with pytest.raises(ValueError, match=r"dataset\[\d+\] is None \(grain's MapDataset.filter"):
        for _ in loader:
            pass
