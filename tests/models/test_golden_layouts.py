"""Golden layouts: every parameter's PartitionSpec for llama3-8b under ``jtp.plans.llama()``
at data 8 x tensor 8, with and without fsdp (as MaxText's sharding dumps do), for the
scanned model (the default: each block parameter stacked on a leading layer axis) and the
unrolled one (``scan_layers=False``: ``layers.0`` ... ``layers.31``); and Mixtral-8x7B's
with fsdp on data 4 x expert 8 x tensor 2 (expert parallelism).

Shapes only: the model comes from ``nnx.eval_shape`` and the mesh is a ``jax.sharding.
AbstractMesh``, so nothing is allocated and no 64 devices are needed. A change to a plan, a
style or the fsdp rule that moves any parameter shows up here as a diff naming it. To accept
an intended change: ``JTP_UPDATE_GOLDEN=1 pytest tests/models/test_golden_layouts.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import jtp
from jtp.models.llama import PRESETS, Llama

GOLDEN = Path(__file__).with_name("golden")
CASES = [(scan, fsdp) for scan in (True, False) for fsdp in (False, True)]
IDS = [f"{'scan' if s else 'unrolled'}-{'fsdp' if f else 'tp'}" for s, f in CASES]


def _layouts(fsdp: bool, scan: bool) -> dict[str, str]:
    """``{path: "shape spec"}``, e.g. ``"(4096, 4096) P(None, 'tensor')"``: one line each."""
    mesh = AbstractMesh((8, 8), (jtp.DATA, jtp.TENSOR))
    config = dataclasses.replace(PRESETS["llama3-8b"], scan_layers=scan)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    return {
        p.path: f"{p.shape} P{tuple(p.spec)!r}"
        for p in jtp.resolve(abstract, mesh, jtp.plans.llama(), fsdp=fsdp)
    }


def _golden(fsdp: bool, scan: bool) -> Path:
    return GOLDEN / f"llama3_8b_8x8{'_scan' if scan else ''}{'_fsdp' if fsdp else ''}.json"


@pytest.mark.parametrize("scan,fsdp", CASES, ids=IDS)
def test_llama3_8b_layouts_match_golden(scan, fsdp):
    got = _layouts(fsdp, scan)
    path = _golden(fsdp, scan)
    if os.environ.get("JTP_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=0, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert sorted(got) == sorted(want), "parameters added or removed"
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert not diff, f"layouts moved (golden, now): {diff}"
    # A few rows spelled out, so the golden file itself is checked by eye once.
    wq = "('data', 'tensor')" if fsdp else "(None, 'tensor')"
    emb = "('tensor', 'data')" if fsdp else "('tensor', None)"
    assert want["tok_embeddings.embedding"] == f"(128256, 4096) P{emb}"
    if scan:
        assert want["layers.attention.wq.kernel"] == f"(32, 4096, 4096) P(None, {wq[1:]}"
        assert want["layers.feed_forward.w2.kernel"].startswith(
            "(32, 14336, 4096) P(None, 'tensor'"
        )
    else:
        assert want["layers.0.attention.wq.kernel"] == f"(4096, 4096) P{wq}"
        assert want["layers.31.feed_forward.w2.kernel"].startswith("(14336, 4096) P('tensor'")


@pytest.mark.parametrize("fsdp", [False, True], ids=["tp", "fsdp"])
def test_a_stacked_parameter_is_every_layer_laid_out_alike(fsdp):
    """Each scanned row is the unrolled rows of its 32 layers (all alike), with the layer
    axis in front of the shape and replicated (``None``) in front of the spec."""
    scanned = json.loads(_golden(fsdp, True).read_text())
    unrolled = json.loads(_golden(fsdp, False).read_text())
    per_layer: dict[str, set[str]] = {}
    for path, row in unrolled.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.*)", path)
        per_layer.setdefault(f"layers.{m[2]}" if m else path, set()).add(row)
    assert set(per_layer) == set(scanned)
    for path, row in scanned.items():
        (one,) = per_layer[path]  # every layer the same
        if path.startswith("layers."):
            shape, spec = re.fullmatch(r"\((.*)\) P\((.*)\)", one).groups()
            one = f"(32, {shape.rstrip(',')}) P(None, {spec.rstrip(',')})"
        assert row == one, (path, row, one)


# Mixtral-8x7B's shapes (the Hub's config.json) on data 4 x expert 8 x tensor 2 with fsdp:
# each device holds one expert (E over "expert"), its hidden width split over "tensor" and
# its model width over "data"; everything else split over ("data", "expert") by fsdp.
MIXTRAL = dict(
    vocab_size=32000,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    ffn_hidden=14336,
    max_seq_len=32768,
    n_experts=8,
    experts_per_token=2,
    gating="mixtral",
)


def test_mixtral_expert_parallel_layouts_match_golden():
    mesh = AbstractMesh((4, 8, 2), (jtp.DATA, jtp.EXPERT, jtp.TENSOR))
    config = dataclasses.replace(PRESETS["tiny"], **MIXTRAL)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    plan = jtp.plans.llama(config, fsdp=True, mesh=mesh)
    got = {
        p.path: f"{p.shape} P{tuple(p.spec)!r}"
        for p in jtp.resolve(abstract, mesh, plan, fsdp=True)
    }
    path = GOLDEN / "mixtral_8x7b_4x8x2_scan_fsdp.json"
    if os.environ.get("JTP_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=0, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got == want
    assert want["layers.feed_forward.experts.w1"] == (
        "(32, 8, 4096, 14336) P(None, 'expert', 'data', 'tensor')"
    )
    assert want["layers.attention.wq.kernel"] == (
        "(32, 4096, 4096) P(None, ('data', 'expert'), 'tensor')"
    )
