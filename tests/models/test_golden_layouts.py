"""Golden layouts: every parameter's PartitionSpec for llama3-8b under ``jtp.plans.llama()``
at data 8 x tensor 8, with and without fsdp (as MaxText's sharding dumps do).

Shapes only: the model comes from ``nnx.eval_shape`` and the mesh is a ``jax.sharding.
AbstractMesh``, so nothing is allocated and no 64 devices are needed. A change to a plan, a
style or the fsdp rule that moves any parameter shows up here as a diff naming it. To accept
an intended change: ``JTP_UPDATE_GOLDEN=1 pytest tests/models/test_golden_layouts.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import jtp
from jtp.models.llama import PRESETS, Llama

GOLDEN = Path(__file__).with_name("golden")


def _layouts(fsdp: bool) -> dict[str, str]:
    """``{path: "shape spec"}``, e.g. ``"(4096, 4096) P(None, 'tensor')"``: one line each."""
    mesh = AbstractMesh((8, 8), (jtp.DATA, jtp.TENSOR))
    abstract = nnx.eval_shape(lambda: Llama(PRESETS["llama3-8b"], rngs=nnx.Rngs(0)))
    return {
        p.path: f"{p.shape} P{tuple(p.spec)!r}"
        for p in jtp.resolve(abstract, mesh, jtp.plans.llama(), fsdp=fsdp)
    }


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
def test_llama3_8b_layouts_match_golden(fsdp):
    got = _layouts(fsdp)
    path = GOLDEN / f"llama3_8b_8x8{'_fsdp' if fsdp else ''}.json"
    if os.environ.get("JTP_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=0, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert sorted(got) == sorted(want), "parameters added or removed"
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert not diff, f"layouts moved (golden, now): {diff}"
    # A few rows spelled out, so the golden file itself is checked by eye once.
    wq = "('data', 'tensor')" if fsdp else "(None, 'tensor')"
    assert want["layers.0.attention.wq.kernel"] == f"(4096, 4096) P{wq}"
    emb = "('tensor', 'data')" if fsdp else "('tensor', None)"
    assert want["tok_embeddings.embedding"] == f"(128256, 4096) P{emb}"
    assert want["layers.31.feed_forward.w2.kernel"].startswith("(14336, 4096) P('tensor'")
