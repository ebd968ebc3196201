"""The capacity planner's "context" axis: the sizes the search proposes (long sequences only,
T divisible by 2C), the layouts with one (devices used once, dense layouts unchanged), a
context row's compiled step (memory per device falls with C, its FLOPs are the global step's
split C ways, its exchange over "context" is the K/V gathers by hand), the link the roofline
charges, and a long sequence planned end to end where only a context layout fits."""

import dataclasses
import json

import jax
import pytest
from helpers import fit_once

import jtp
from jtp.capacity.measure import analytic_floor, bucket, kv_exchange_bytes, measure
from jtp.capacity.planner import Layout, Request, _chosen, context_sizes, layouts
from jtp.capacity.roofline import Hardware, estimate
from jtp.cli.capacity import main
from jtp.errors import InputError
from jtp.models.llama import PRESETS
from jtp.recipes import LlamaTask, LlamaTaskConfig

SEQ = 256
TINY = PRESETS["tiny"]
# layouts(8, 8, 4, 4, 8, 32, ("none",)) before the context axis (test_capacity_expert.py)
DENSE_8 = ["8x1 -", "8x1 fsdp", "4x2 -", "4x2 sp", "4x2 fsdp", "4x2 fsdp,sp"]
DENSE_8 += ["2x4 -", "2x4 sp", "2x4 fsdp", "2x4 fsdp,sp"]


def test_the_search_proposes_context_for_long_sequences_only():
    """Powers of two dividing the devices, T divisible by 2C, pieces of >= 8192 tokens: a
    request at 8192 tokens (the default tables) gets no context axis, one at 131,072 gets
    every size up to 8 on one host and 16 on 64 GPUs. Each layout uses every device once
    (data x context x tensor), and the layouts without the axis are those of before."""
    assert context_sizes(8, 8192) == [1]
    assert context_sizes(8, 131072) == [1, 2, 4, 8]
    assert context_sizes(64, 131072) == [1, 2, 4, 8, 16]
    assert context_sizes(64, 3 * 8192) == [1, 2]  # 4 pieces would be 6,144 tokens
    assert context_sizes(8, 16386) == [1]  # 16386 is not divisible by 2 x 2
    found = layouts(8, 8, 4, 4, 8, 32, ("none",), contexts=(1, 2, 4, 8))
    assert [c.label() for c in found if c.context == 1] == DENSE_8
    for c in found:
        assert c.data * c.context * c.tensor == 8 and 32 % (2 * c.context) == 0
        assert not c.sequence_parallel or 32 % (c.context * c.tensor) == 0
    assert {(c.context, c.tensor) for c in found if c.context > 1} == {
        (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4)
    }  # fmt: skip
    assert "1x8x1 -" in {c.label() for c in found}  # data 1: no fsdp (one batch rank)
    # fsdp shards the state over data (and tensor), never over "context"
    llama = PRESETS["llama3-8b"]
    fsdp = Layout(8, 1, True, False, "full", context=8)
    assert analytic_floor(llama, 64, fsdp, "bf16-mixed") == llama.num_params() * 16 / 8
    assert Layout(2, 2, False, True, "full", context=2).label() == "2x2x2 sp,remat"

    short = Request(model="tiny", devices=8, global_batch=8, seq_len=SEQ, remat=("none",))
    assert {c.context for c in _chosen(short, TINY)} == {1}
    long = dataclasses.replace(short, seq_len=65536)
    assert {c.context for c in _chosen(long, TINY)} == {1, 2, 4, 8}
    only = dataclasses.replace(short, context=(4,))
    assert {c.context for c in _chosen(only, TINY)} == {4}


def test_the_search_refuses_a_context_that_does_not_split_the_sequence():
    """The balanced order cuts T into 2C chunks: T = 36 with context 4 (8 chunks) is refused
    with the reason, as is a size that does not divide the devices; layouts() skips them."""
    bad = Request(model="tiny", devices=8, global_batch=8, seq_len=36, context=(4,))
    with pytest.raises(InputError, match=r"--context 4: sequence length 36 is not divisible "):
        _chosen(bad, TINY)
    with pytest.raises(InputError, match=r"2 x context = 8"):
        main(["--model", "tiny", "--devices", "8", "--seq-len", "36", "--context", "4"])
    with pytest.raises(InputError, match=r"--context 3: it does not divide --devices 8"):
        _chosen(dataclasses.replace(bad, context=(3,)), TINY)
    assert layouts(8, 8, 4, 4, 8, 36, ("none",), contexts=(4,)) == []


def test_a_context_row_splits_memory_and_flops_and_exchanges_the_kv_gathers():
    """The tiny Llama (2 layers, T = 256, one sequence, float32) compiled on context 1 and 4
    (data 1, tensor 1), and on context 4 with remat:

    - memory per device falls with C: the part above the replicated state (the floor)
      falls more than 2.5x at C = 4 (ideal 4x; the gathered K/V, whole on every device, and
      the step's fixed buffers do not split);
    - FLOPs per device are one device's divided by C, exactly (the attention's, run in a
      shard_map on the device's queries against all keys, counted once per device);
    - the wire bytes over "context" are the K/V gathers and their gradients' scatters by
      hand (:func:`kv_exchange_bytes`) plus the positions' gather ((C - 1) / C x T int32),
      exactly; with remat the forward's gathers are repeated in the backward (1.5x).

    Float32, because the CPU backend promotes bf16 reductions (the scatters) to float32
    where a GPU scatters bf16; the attention is then XLA's (what a GPU runs in float32)."""
    model = dataclasses.replace(TINY, n_layers=2)
    rows = {}
    for c, remat in ((1, "none"), (4, "none"), (4, "full")):
        layout = Layout(1, 1, False, False, remat, context=c)
        rows[c, remat] = measure(layout, "tiny", 2, SEQ, 1, "32-true", jax.devices()[:c])
    one, four, remat = rows[1, "none"], rows[4, "none"], rows[4, "full"]
    floor = analytic_floor(model, 1, Layout(1, 1, False, False, "none"), "32-true")
    assert one["memory"] - floor > 2.5 * (four["memory"] - floor) > 0
    assert four["flops"] * 4 == one["flops"]
    assert one["bytes_context"] == one["wire_context"] == 0
    positions = 3 / 4 * SEQ * 4
    kv = kv_exchange_bytes(model, Layout(1, 1, False, False, "none", context=4), SEQ, 1, "32-true")
    assert kv > 0 and four["wire_context"] == kv + positions
    assert four["bytes_data"] > 0  # the weights' gradients, summed over the pieces
    kv_remat = kv_exchange_bytes(
        model, Layout(1, 1, False, False, "full", context=4), SEQ, 1, "32-true"
    )
    assert kv_remat == 1.5 * kv and remat["wire_context"] == kv_remat + positions


def test_a_context_row_is_the_trainers_compiled_step():
    """The planner compiles what ``fit`` runs on a mesh with a context axis: data 2 x
    context 2 x tensor 2 with sequence parallelism, two sequences per step, gives the
    trainer's memory per device and its bytes over "context" (the K/V gathers and their
    gradients' scatters), exactly."""
    layout = Layout(2, 2, False, True, "none", context=2)
    planned = measure(layout, "tiny", TINY.n_layers, 32, 1, "32-true", jax.devices())
    task = LlamaTask(
        LlamaTaskConfig(
            seq_len=32, batch_size=2, samples=2, sequence_parallel=True, loss_parallel=True
        )
    )
    trainer = fit_once(jtp.ModelParallelStrategy(2, 2, context_parallel_size=2), task)
    assert planned["memory"] == trainer.peak_memory_bytes_per_device
    colls = jtp.collectives(trainer.compiled_step, trainer.mesh)
    context = sum(c.bytes for c in colls if bucket(c) == "context")
    assert planned["bytes_context"] == context > 0
    assert planned["bytes_tensor"] == sum(c.bytes for c in colls if bucket(c) == "tensor")


def test_the_roofline_charges_the_exchange_at_the_link_the_group_spans():
    """A context x tensor group inside a host (8 GPUs) is charged at NVLink, one that
    spans hosts at the network's bandwidth."""
    m = dict.fromkeys(("flops", "wire_tensor", "wire_data", "wire_both"), 0.0)
    m["wire_context"] = 1e9
    hw = Hardware()
    inside = (
        Layout(1, 4, False, False, "none", context=2),
        Layout(8, 1, True, False, "none", context=8),
    )
    for layout in inside:
        assert estimate(m, layout, hw, 8)["comm_s"] == 1 / hw.intra_host_gbps
    across = Layout(1, 4, False, False, "none", context=4)
    assert estimate(m, across, hw, 8)["comm_s"] == 1 / hw.inter_host_gbps


def test_only_a_context_layout_fits_end_to_end(tmp_path, capsys, monkeypatch):
    """The tiny Llama at 512 tokens on 2 devices (one host), 2 sequences per step (float32),
    ``--context 1,2 --tensor 1``: rows 2x1 (with and without fsdp) and 1x2x1. The context
    row needs less memory per device than either; with a budget between them only it fits:
    it is recommended, and the table prints the context column and says why it is needed.
    The second search replays the first one's compiles (same layouts, same figures)."""
    from jtp.capacity import planner

    seen = {}

    def once(layout, *args, **kwargs):
        if layout not in seen:
            seen[layout] = measure(layout, *args, **kwargs)
        return seen[layout]

    monkeypatch.setattr(planner, "measure", once)
    out = tmp_path / "plan.json"
    argv = [
        "--model", "tiny", "--devices", "2", "--devices-per-host", "2", "--global-batch", "2",
        "--seq-len", "512", "--tensor", "1", "--context", "1,2", "--remat", "none",
        "--precision", "32-true", "--mem-fraction", "1", "--json", str(out),
    ]  # fmt: skip
    payload = main([*argv, "--device-memory-gb", "1000"])
    rows = {r["label"]: r for r in payload["rows"]}
    assert set(rows) == {"2x1 -", "2x1 fsdp", "1x2x1 -"}
    ctx = rows["1x2x1 -"]
    assert ctx["config"]["context"] == 2 and ctx["accumulate"] == 2
    assert ctx["context_bytes_per_step"] > 0 and ctx["kv_exchange_bytes_per_step"] > 0
    assert "context_bytes_per_step" not in rows["2x1 -"]
    others = min(r["memory_bytes"] for label, r in rows.items() if label != "1x2x1 -")
    assert ctx["memory_bytes"] < others
    budget = (ctx["memory_bytes"] + others) / 2 / 1e9
    capsys.readouterr()
    payload = main([*argv, "--device-memory-gb", str(budget)])
    assert len(seen) == 3
    assert payload["recommended"]["label"] == "1x2x1 -"
    assert json.loads(out.read_text())["recommended"]["label"] == "1x2x1 -"
    text = capsys.readouterr().out
    assert "d x [c x] t, options" in text and "ctx GB/step" in text
    why = "each device holds the activations of 256 of each sequence's 512 tokens"
    assert f"context axis: needed (only layouts with one fit; best 1x2x1 -; {why}" in text
    assert "blockwise" not in text  # float32: XLA's attention, by position
