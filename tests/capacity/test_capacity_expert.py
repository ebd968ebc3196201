"""The capacity planner's "expert" mesh axis: MoE requests get expert layouts (X divides E,
X x tensor in one host) and dense ones exactly the layouts of before; an expert row's
all-to-all bytes are those of the trainer's own compiled step on that mesh; the experts'
floor falls X-fold; the roofline charges the all-to-alls at the link the group spans."""

import dataclasses

import jax
from helpers import fit_once

import jtp
from jtp.capacity.measure import analytic_floor, expert_floor
from jtp.capacity.planner import Layout, Request, _chosen, layouts, search
from jtp.capacity.roofline import Hardware, estimate
from jtp.models.llama import PRESETS
from jtp.recipes import LlamaTask, LlamaTaskConfig

SEQ = 32
# Recorded before the expert axis existed (layouts(8, 8, 4, 4, 8, 32, ("none",)), the tiny
# preset's request below and layouts(64, 8, 32, 8, 256, 8192, ("dots",)) at main 6cf715e):
# a dense model's layouts must not move.
DENSE_8 = ["8x1 -", "8x1 fsdp", "4x2 -", "4x2 sp", "4x2 fsdp", "4x2 fsdp,sp"]
DENSE_8 += ["2x4 -", "2x4 sp", "2x4 fsdp", "2x4 fsdp,sp"]
TINY_8 = DENSE_8 + ["1x8 -", "1x8 sp"]
DENSE_64 = [
    f"{d}x{t} {o}"
    for d, t in ((64, 1), (32, 2), (16, 4), (8, 8))
    for o in (("remat=dots", "fsdp,remat=dots") if t == 1 else
              ("remat=dots", "sp,remat=dots", "fsdp,remat=dots", "fsdp,sp,remat=dots"))
]  # fmt: skip


def test_dense_layouts_are_unchanged_and_moe_ones_add_expert_axes():
    assert [c.label() for c in layouts(8, 8, 4, 4, 8, SEQ, ("none",))] == DENSE_8
    assert [c.label() for c in layouts(64, 8, 32, 8, 256, 8192, ("dots",))] == DENSE_64
    dense = Request(model="tiny", devices=8, global_batch=8, seq_len=SEQ, remat=("none",))
    chosen = _chosen(dense, dense.model_config())
    assert all(c.expert == 1 for c in chosen)
    assert [c.label() for c in chosen] == TINY_8
    moe = dataclasses.replace(dense, model="tiny-moe")
    config = moe.model_config()
    found = _chosen(moe, config)
    experts = {c.expert for c in found}
    assert experts == {1, 2, 4, 8}  # every divisor of E = 8 that fits a host with tensor
    for c in found:
        assert config.n_experts % c.expert == 0
        assert c.expert * c.tensor <= 8 and c.data * c.expert * c.tensor == 8
    assert {(c.expert, c.tensor) for c in found if c.expert > 1} == {
        (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4)
    }  # fmt: skip
    # the layouts without the axis are the dense model's (same heads); the axis adds the rest
    assert [c.label() for c in found if c.expert == 1] == TINY_8
    assert Layout(2, 2, False, False, "none", expert=2).label() == "2x2x2 -"
    # X x tensor stays in one host: 64 devices, 8 per host, tensor 8 leaves only X = 1
    big = layouts(64, 8, 32, 8, 256, 8192, ("dots",), n_experts=8)
    assert {c.expert for c in big if c.tensor == 8} == {1}
    assert {c.expert for c in big if c.tensor == 2} == {1, 2, 4}


def test_expert_floor_falls_by_x():
    for name, n in (("tiny-moe", 8), ("mixtral-8x7b", 64)):
        config = PRESETS[name]
        base = Layout(n // 2, 2, False, False, "none")
        for x in (2, 4):
            lay = Layout(n // (2 * x), 2, False, False, "none", expert=x)
            assert (
                expert_floor(config, n, lay, "bf16-mixed")
                == expert_floor(config, n, base, "bf16-mixed") / x
            )
            # the rest of the state is split as before: the floor falls by the experts' share
            drop = expert_floor(config, n, base, "bf16-mixed") * (1 - 1 / x)
            assert (
                abs(
                    analytic_floor(config, n, base, "bf16-mixed")
                    - analytic_floor(config, n, lay, "bf16-mixed")
                    - drop
                )
                < 1e-6 * drop
            )


def test_expert_row_all_to_all_bytes_are_the_trainers_compiled_step(monkeypatch):
    """A row with expert 2 on 8 devices: its all-to-all bytes per step are positive and
    equal to the all-to-alls over "expert" of the step the trainer compiles on that mesh;
    the table marks the axis; the roofline charges them in-host (2 x 2 fits a host of 8)
    and across hosts when the group does not fit (a host of 2). Compiled with the CPU's own
    options, as fit compiles it (the planner's default sizes a GPU's program,
    jtp.capacity.measure.AS_ON_GPU, whose reductions differ: 1,280 bytes less here)."""
    monkeypatch.setattr("jtp.capacity.measure.AS_ON_GPU", None)
    request = Request(
        model="tiny-moe",
        devices=8,
        global_batch=8,
        seq_len=SEQ,
        precision="32-true",
        tensor=(2,),
        expert=(1, 2),
        remat=("none",),
    )
    # only the plain layouts: fsdp and sp would add compiles without adding a check
    table = search(request, devices=jax.devices())
    rows = {r["label"]: r for r in table.rows}
    assert {"4x2 -", "2x2x2 -"} <= set(rows)
    row = rows["2x2x2 -"]
    assert row["config"]["expert"] == 2 and rows["4x2 -"]["config"]["expert"] == 1
    assert rows["4x2 -"]["expert_bytes_per_step"] == 0
    assert row["expert_bytes_per_step"] > 0
    assert row["accumulate"] == 2  # 8 sequences over 2 x 2 batch ranks, one each

    task = LlamaTask(
        LlamaTaskConfig(preset="tiny-moe", seq_len=SEQ, batch_size=4, samples=8, loss_parallel=True)
    )
    trainer = fit_once(
        jtp.ModelParallelStrategy(2, 2, expert_parallel_size=2), task, accumulate_grad_batches=2
    )
    colls = jtp.collectives(trainer.compiled_step, trainer.mesh)
    a2a = sum(c.bytes for c in colls if c.kind == "all-to-all" and "expert" in (c.axes or ()))
    assert a2a > 0
    assert row["expert_bytes_per_step"] == a2a
    assert row["memory_bytes"] == trainer.peak_memory_bytes_per_device

    text = table.format()
    assert "a2a GB/step" in text and "expert axis: " in text
    layout = Layout(2, 2, False, False, "none", expert=2)
    m = {"flops": 0.0, "wire_tensor": 0.0, "wire_data": 0.0, "wire_both": 0.0}
    m["wire_expert"] = 1e9
    hw = Hardware()
    assert estimate(m, layout, hw, 8)["comm_s"] == 1 / hw.intra_host_gbps
    assert estimate(m, layout, hw, 2)["comm_s"] == 1 / hw.inter_host_gbps
