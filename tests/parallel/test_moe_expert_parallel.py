"""A whole MoE Llama on meshes with an "expert" axis against one device: one training
step's loss and gradients, the compiled step's all-to-alls over "expert",
``python -m jtp.train --expert-parallel`` (with fsdp and per-rank accumulation), and two
processes whose expert groups span both.

Tolerance 2e-6, norm-relative (``rel_err``) for the gradients, 2e-6 relative for the loss:
test_moe's decoder tolerance (the same float32 ops on the same values, summed in another
order: the batch split over data x expert sums each gradient's rows per device then over
devices, the tensor split sums partial products, the exchange reorders nothing but rows);
routing is computed from the same numbers on both sides, and the same expert loads are
asserted, so no near-tie flipped. Seen: gradients <= 1.4e-6 (the router's kernel, then wq and
wk), loss <= 7e-8, with AVX-512 and with XLA_FLAGS=--xla_cpu_max_isa=AVX2 alike; the same
1.4e-6 as on ("data", "tensor") = (4, 2) without the axis: the exchange adds no error.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err
from processes import free_port, start_process, wait_all

import jtp
from jtp.analysis.collectives import collectives
from jtp.models.decoder import cross_entropy
from jtp.models.llama import PRESETS, Llama
from jtp.models.moe import load_balancing_loss
from jtp.models.plans import llama as llama_plan
from jtp.parallel.activations import activation_rules
from jtp.parallel.names import path_str

TOL = 2e-6
CONFIG = dataclasses.replace(
    PRESETS["tiny"], n_layers=2, n_experts=8, experts_per_token=2, moe_ffn_hidden=64
)
MESHES = {
    "d2e2t2": dict(data=2, expert=2, tensor=2),
    "e8": dict(expert=8),  # (expert x tensor without data: covered by d2e2t2's)
}
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 17), dtype=np.int32)


def _loss(graphdef, tokens):
    def loss(params):
        logits, stats = nnx.merge(graphdef, params)(tokens[:, :-1], router_stats=True)
        ce = cross_entropy(logits, tokens[:, 1:])
        return ce + 0.01 * load_balancing_loss(stats), stats.expert_tokens

    return loss


def _flat(grads):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def _one_device():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    (loss, load), grads = jax.jit(jax.value_and_grad(_loss(graphdef, TOKENS), has_aux=True))(params)
    return float(loss), np.asarray(load), _flat(grads)


def _sharded(mesh):
    """Loss, expert loads, gradients and the compiled step on ``mesh``."""
    plan = llama_plan(CONFIG, mesh=mesh)
    model = jtp.sharded_init(lambda: Llama(CONFIG, rngs=nnx.Rngs(0)), mesh, plan)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jtp.shard_batch(TOKENS, mesh)
    step = jax.jit(jax.value_and_grad(_loss(graphdef, tokens), has_aux=True))
    with activation_rules(mesh, plan.activations):
        compiled = step.lower(params).compile()
    (loss, load), grads = compiled(params)
    return float(loss), np.asarray(load), _flat(grads), compiled, params


@pytest.fixture(scope="module")
def reference():
    return _one_device()


@pytest.mark.parametrize("shape", list(MESHES.values()), ids=list(MESHES))
def test_training_step_equals_one_device(shape, reference):
    mesh = jtp.make_mesh(**shape)
    ref_loss, ref_load, ref_grads = reference
    loss, load, grads, compiled, params = _sharded(mesh)
    np.testing.assert_array_equal(load, ref_load)  # same routing: no near-tie flipped
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) <= TOL, errors


def _expert_groups(mesh):
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    x = mesh.axis_names.index("expert")
    return sorted(tuple(sorted(g)) for g in np.moveaxis(ids, x, -1).reshape(-1, ids.shape[x]))


@pytest.mark.parametrize("shape", list(MESHES.values()), ids=list(MESHES))
def test_compiled_step_exchanges_tokens_and_never_gathers_an_expert(shape):
    """The step (forward + backward, layers scanned: one body, ``trips`` = layers): exactly
    two all-to-alls over "expert" in the forward and two in the backward, each of the
    padded exchange's X * M rows of D (M = this device's tokens x k), replica groups the
    expert groups; every expert weight stays a (E/X, D, F/T) shard; the only all-gather over
    "expert" is the exchange's (X, E) int32 pair counts: no weight (nor any float) is."""
    mesh = jtp.make_mesh(**shape)
    _, _, _, compiled, params = _sharded(mesh)
    x, t = mesh.shape["expert"], mesh.shape["tensor"]
    w1 = params["layers"]["feed_forward"]["experts"]["w1"].get_value()
    local = (CONFIG.n_layers, CONFIG.n_experts // x, CONFIG.dim, CONFIG.moe_ffn_hidden // t)
    assert w1.sharding.shard_shape(w1.shape) == local
    records = collectives(compiled, mesh)
    a2a = [c for c in records if c.kind == "all-to-all"]
    m = TOKENS.shape[0] * (TOKENS.shape[1] - 1) // jtp.mesh.batch_ranks(mesh) * 2  # k = 2
    assert len(a2a) == 4, a2a
    assert sum("transpose" not in c.op_name for c in a2a) == 2  # the forward's pair
    for c in a2a:
        assert c.axes == ("expert",) and c.trips == CONFIG.n_layers
        assert sorted(tuple(sorted(g)) for g in c.groups) == _expert_groups(mesh)
        assert c.bytes == x * m * CONFIG.dim * 4 * c.trips
    gathers = [c for c in records if c.kind == "all-gather" and "expert" in (c.axes or ())]
    assert [(c.axes, c.dtype, c.shapes) for c in gathers] == [
        (("expert",), "s32", ((x, CONFIG.n_experts),))
    ]


@pytest.mark.parametrize(
    "extra",
    [["--fsdp"], ["--accumulate-grad-batches", "2", "--grad-reduce", "per_step"]],
    ids=["fsdp", "per-rank-accumulation"],
)
def test_cli_trains_a_moe_llama_with_expert_parallel(tmp_path, extra):
    """``python -m jtp.train --expert-parallel 2`` on (2, 2, 2): the losses of the same run
    on ("data", "tensor") = (4, 2), within 2e-6 relative (the step test's tolerance); with
    fsdp (expert weights split over "data" besides "expert") and with the per-data-rank
    accumulation loop (the exchange inside its vmap)."""
    from jtp.cli.train import main

    common = "--devices 8 --model llama --preset tiny-moe --max-steps 3 --no-progress".split()
    common += ["--seq-len", "16", "--batch-size", "8", "--root-dir", str(tmp_path / "runs")]
    common += extra
    ep = main([*common, "--data-parallel", "2", "--expert-parallel", "2", "--tensor-parallel", "2"])
    dp = main([*common, "--data-parallel", "4", "--tensor-parallel", "2"])
    assert ep["mesh"] == {"data": 2, "expert": 2, "tensor": 2}
    assert dp["mesh"] == {"data": 4, "tensor": 2}
    assert len(ep["losses"]) == 3 and all(np.isfinite(ep["losses"]))
    np.testing.assert_allclose(ep["losses"], dp["losses"], rtol=TOL)


def test_cli_refuses_an_expert_size_that_does_not_divide_the_experts(tmp_path):
    from helpers import backend_compiles

    from jtp.cli.train import main
    from jtp.errors import InputError

    argv = "--devices 6 --model llama --preset tiny-moe --expert-parallel 3 --max-steps 1"
    with backend_compiles() as compiles, pytest.raises(InputError, match="n_experts=8 is not"):
        main([*argv.split(), "--no-progress", "--root-dir", str(tmp_path / "runs")])
    assert compiles == []


def test_two_processes_with_the_expert_axis_across_them_equal_one(tmp_path):
    """Mesh (1, 4, 2) over two processes of 4 devices: each expert group spans both, so
    the exchange's all-to-alls cross processes (gloo), and each process's loader reads the
    rows of its own batch ranks. Losses equal the one-process run's within 1e-5 relative
    (test_multiprocess's tolerance: gloo may sum in another order)."""
    flags = "--model llama --preset tiny-moe --max-steps 2 --seq-len 16 --batch-size 8".split()
    flags += "--expert-parallel 4 --tensor-parallel 2 --no-progress".split()
    flags += ["--root-dir", str(tmp_path / "runs")]

    def launch(n, tag):
        port = free_port()
        multi = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
        return [
            start_process(
                [*flags, *(multi + ["--process-id", str(i)] if n > 1 else [])]
                + ["--devices", str(8 // n), "--metrics-json", str(tmp_path / f"{tag}{i}.json")],
                tmp_path / f"{tag}{i}.log",
            )
            for i in range(n)
        ]

    def logs(tag, n):
        return "".join((tmp_path / f"{tag}{i}.log").read_text()[-2000:] for i in range(n))

    assert wait_all(launch(1, "one")) == [0], logs("one", 1)
    assert wait_all(launch(2, "two")) == [0, 0], logs("two", 2)
    ref = json.loads((tmp_path / "one0.json").read_text())
    got = [json.loads((tmp_path / f"two{i}.json").read_text()) for i in range(2)]
    assert got[0]["mesh"] == {"data": 1, "expert": 4, "tensor": 2}
    assert got[0]["losses"] == got[1]["losses"]
    np.testing.assert_allclose(got[0]["losses"], ref["losses"], rtol=1e-5)
