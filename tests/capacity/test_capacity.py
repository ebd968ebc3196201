"""The capacity planner: agreement with the trainer's own compiled step (scanned, the whole
depth), its FLOP count, a Llama-3-8B row against a hand count, usable memory, and an
end-to-end run on the tiny preset."""

import json

import jax
import pytest
from helpers import fit_once

import jtp
from jtp.analysis.memory import KEEP_BF16, memory_breakdown
from jtp.capacity.measure import AS_ON_GPU, measure
from jtp.capacity.planner import Layout, layouts
from jtp.capacity.roofline import Hardware, default_mem_fraction, estimate
from jtp.cli.capacity import main
from jtp.models.llama import PRESETS, LlamaConfig
from jtp.recipes import LlamaTask, LlamaTaskConfig
from jtp.recipes.llama import trace_llama_step

SEQ = 32


@pytest.mark.parametrize(
    "fsdp,k", [(True, 1), (True, 4), (False, 4)], ids=["fsdp-k1", "fsdp-k4", "tp-k4"]
)
def test_planner_equals_the_trainers_compiled_step(fsdp, k):
    """The planner compiles what fit runs, layers scanned and accumulation included: the same
    memory (the accumulation buffer counted) and the same bytes per optimizer step (the layer
    loop's and the accumulation loop's collectives counted once per trip). Its FLOPs are
    checked against a hand count below (XLA's cost analysis counts a loop body once).
    ``as_gpu=False``: compiled as fit compiles it on these CPU devices (the planner's
    default sizes a GPU's program: test_gpu_sizing_drops_the_cpus_float32_logits)."""
    config = Layout(2, 4, fsdp=fsdp, sequence_parallel=True, remat="none")
    planned = measure(config, "tiny", 2, SEQ, 4, "32-true", jax.devices(), k, as_gpu=False)
    task = LlamaTask(
        LlamaTaskConfig(
            seq_len=SEQ,
            batch_size=8,
            samples=8 * k,
            fsdp=fsdp,
            sequence_parallel=True,
            loss_parallel=True,
        )
    )
    trainer = fit_once(jtp.ModelParallelStrategy(2, 4, fsdp=fsdp), task, accumulate_grad_batches=k)
    assert trainer.global_step == 1
    assert planned["memory"] == trainer.peak_memory_bytes_per_device
    colls = jtp.collectives(trainer.compiled_step, trainer.mesh)
    assert planned["bytes_tensor"] == sum(c.bytes for c in colls if c.axes == ("tensor",))
    assert planned["bytes_data"] == sum(c.bytes for c in colls if c.axes == ("data",))


def _matmul_flops(c, batch, seq, *, remat, flash):
    """Matmul FLOPs of one train step by hand: a forward matmul of an (in, out) kernel costs
    2 x in x out per token, each of attention's (T, S) products 2 x T x S x E per head and
    sequence (two in the forward); the backward costs twice the forward (gradients of both
    operands), except that a flash backward (the blockwise kernel; cuDNN's alike) also
    recomputes the scores, a fifth (T, S) product, and takes rowsum(dO x O), 2 x T x E per
    head; remat repeats the blocks' forward once more but for w2, whose output its
    backward does not need (jax drops it). The embedding is a lookup."""
    d, e, f = c.dim, c.head_dim, c.ffn_hidden
    block = d * c.n_heads * e * 2 + d * c.n_kv_heads * e * 2 + 3 * d * f
    linear_fwd = 2 * batch * seq * block
    recompute = linear_fwd - 2 * batch * seq * f * d if remat else 0
    attention = _attention_flops(c, batch, seq, remat=remat, flash=flash) // c.n_layers
    block_total = linear_fwd * 3 + recompute + attention
    return c.n_layers * block_total + 2 * batch * seq * d * c.vocab_size * 3


def _tiny_request(precision):
    """One layout of the tiny preset on 8 devices: tensor 8, no remat, batch 8 x SEQ."""
    from jtp.capacity import Request

    return Request(
        model="tiny",
        devices=8,
        global_batch=8,
        seq_len=SEQ,
        precision=precision,
        tensor=(8,),
        remat=("none",),
    )


def _attention_flops(c, batch, seq, *, remat, flash):
    """The part of :func:`_matmul_flops` that attention's (T, S) products make, all layers."""
    scores = 2 * batch * c.n_heads * seq * seq * c.head_dim  # one (T, S) product
    fwd_products = 4 if remat else 2  # QK^T and PV, twice with remat
    bwd_products = 5 if flash else 4
    attention = scores * (fwd_products + bwd_products)
    attention += 2 * batch * c.n_heads * seq * c.head_dim if flash else 0
    return c.n_layers * attention


@pytest.mark.parametrize("remat", [False, True], ids=["no-remat", "remat"])
def test_matmul_flops_by_hand_and_by_dtype(remat):
    """The planner's per-device FLOPs x devices is the hand count exactly (every matmul is
    split over the 8 devices), for 32-true (XLA's attention) and for bf16-mixed (the
    blockwise attention standing for cuDNN's flash kernel). Under bf16-mixed at least 95%
    of them have bf16 operands, under 32-true none (the time model prices them apart)."""
    config = Layout(2, 4, fsdp=False, sequence_parallel=False, remat=remat)
    for precision, flash in (("32-true", False), ("bf16-mixed", True)):
        want = _matmul_flops(PRESETS["tiny"], 8, SEQ, remat=remat, flash=flash)
        m = measure(config, "tiny", PRESETS["tiny"].n_layers, SEQ, 4, precision, jax.devices())
        assert m["flops"] * 8 == want, precision  # integer counts, exact in float64
        share = m["flops_bf16"] / m["flops"]
        assert share == 0.0 if precision == "32-true" else share >= 0.95


def test_fp8_is_priced_at_the_fp8_peak_and_says_what_it_sizes():
    """``--precision transformer-engine``: every matmul but attention's products has
    float8 operands (the hand count split: projections, feed-forward and the untied head
    are the policy's linear layers; attention's (T, S) products are bf16 and the flash
    backward's rowsum(dO x O) float32), those FLOPs are priced at twice the bf16 peak,
    and the header says so and that the CPU's bf16 copies of float8 operands are counted
    (XLA's CPU has no float8 dot; a GPU's float8 matmul makes no copies)."""
    from jtp.capacity import search

    config = PRESETS["tiny"]
    table = search(_tiny_request("transformer-engine"), devices=jax.devices())
    total = _matmul_flops(config, 8, SEQ, remat=False, flash=True)
    attention = _attention_flops(config, 8, SEQ, remat=False, flash=True)
    hw = Hardware()
    rate = hw.peak_tflops * 1e12 * hw.compute_efficiency
    for row in table.rows:
        flops, f8, bf16 = (
            row[k] * 8 for k in ("flops_per_step", "float8_flops_per_step", "bf16_flops_per_step")
        )
        rowsum = 2 * 8 * config.n_heads * SEQ * config.head_dim * config.n_layers  # float32
        assert flops == total and (f8, bf16) == (total - attention, attention - rowsum)
        want = (bf16 / rate + f8 / (rate * hw.fp8_ratio) + rowsum / (rate * hw.fp32_ratio)) / 8
        assert row["compute_s"] == pytest.approx(want, rel=1e-12)
    header = table.format().split("\n")[:4]
    assert any("float8 at 2x" in line for line in header)
    assert any("float8 operands' bf16 copies included" in line for line in header)


def test_time_model_prices_float32_matmuls_at_the_tf32_ratio():
    hw = Hardware(peak_tflops=1000.0, compute_efficiency=0.5, fp32_ratio=0.5)
    config = Layout(1, 8, False, False, False)
    wire = {"wire_tensor": 0.0, "wire_data": 0.0, "wire_both": 0.0}
    bf16 = estimate({"flops": 1e15, "flops_bf16": 1e15, **wire}, config, hw, 8)
    fp32 = estimate({"flops": 1e15, "flops_bf16": 0.0, **wire}, config, hw, 8)
    assert bf16["compute_s"] == pytest.approx(2.0) and fp32["compute_s"] == pytest.approx(4.0)


def test_usable_memory_is_the_preallocated_fraction(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert default_mem_fraction() == 0.75
    assert Hardware(memory_gb=80.0).usable_bytes == 60e9
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    assert default_mem_fraction() == 0.9
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION=1.5"):
        default_mem_fraction()


def test_gpu_sizing_drops_the_cpus_float32_logits():
    """The planner's CPU compile (AS_ON_GPU) against the CPU's own with bf16 kept (KEEP_BF16),
    on one bf16-mixed Llama step whose loss dominates, compiled as the planner compiles
    Llama-3-8B (scanned, remat=dots, blockwise attention): T = 128, V = 4096, D = 32, one
    layer. The same arguments, outputs and donations; the temporaries smaller by two
    float32 (T, V) buffers (4.2 GB each for Llama-3-8B at T = 8192), plus the CPU's partial
    sums of the reductions (seen 97,792 bytes, 4.7% of one such buffer: the bound is a
    quarter). The CPU's own compile holds three float32 (T, V) buffers that its reductions
    take whole and a GPU's compute inside their kernels (the widened logits, the one-hot of
    the labels, their product), as at Llama-3-8B's peak; AS_ON_GPU's holds one, the exp of
    the logits (seen in the optimised HLO, ``compiled.as_text()``)."""
    t, v = 128, 4096
    model = LlamaConfig(
        vocab_size=v, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=t
    )
    task = LlamaTaskConfig(seq_len=t, batch_size=1, remat="dots", attention="blockwise")
    lowered = trace_llama_step(
        task, (1, 1), jax.devices(), precision="bf16-mixed", model_config=model
    )[0].lower()
    cpu, gpu = (memory_breakdown(lowered.compile(o)) for o in (KEEP_BF16, AS_ON_GPU))
    for part in ("arguments", "outputs", "aliased"):
        assert gpu[part] == cpu[part], part
    logits_f32 = t * v * 4
    assert 2 * logits_f32 <= cpu["temps"] - gpu["temps"] < 2.25 * logits_f32


def test_llama3_8b_one_host_tp8_remat_against_a_hand_count():
    """Llama-3-8B, T = 8192, bf16-mixed, tensor 8 on one host, remat, one sequence per
    step, the whole scanned step. Counted by hand per device, GB = 1e9 bytes,
    N = 8,030,261,248 parameters, n = N / 8 per device (the norm scales, 0.003% of N, are
    replicated: ignored):

      parameters, float32                          4 n           =  4.015
      AdamW moments, 2 x float32                   8 n           =  8.030
      bf16 copies of the weights (the step casts)  2 n           =  2.008
      gradients, bf16 until the layer loop ends (the scan's backward writes all layers'
        into one stacked buffer; float32 after it)  2 n           =  2.008
      saved activations: each block's input, bf16, whole (T, D) on every device without
        sequence parallelism: L x T x D x 2 = 32 x 8192 x 4096 x 2  =  2.147
      the peak is in the backward loop's last layers: that block's backward, about
        seven (T, D) float32 buffers, 7 x 8192 x 4096 x 4              =  0.940
                                                                   total 19.15 GB

    The loss's transient is smaller on a GPU: logits (T, V / 8) in bf16, the float32 exp
    of them and their bf16 gradient, 8192 x 16032 x (2 + 4 + 2) = 1.05 GB. The CPU's own
    compile adds two float32 copies (1.05 GB more: jtp.capacity.measure.AS_ON_GPU says why)
    and peaks there instead (21.16 GB). Attention adds O(T) (blockwise, as cuDNN's
    kernel). The planner's figure (XLA's buffer assignment, with its packing and reuse)
    must be within 10% of the count. With two micro-steps of accumulation (the planner's
    tables) the step adds the float32 accumulator, 4 n, and less than one more set of bf16
    weights, 2 n."""
    n = PRESETS["llama3-8b"].num_params() / 8
    t, d = 8192, 4096
    hand = 4 * n + 8 * n + 2 * n + 2 * n + 32 * t * d * 2 + 7 * t * d * 4
    assert hand / 1e9 == pytest.approx(19.15, abs=0.01)
    config = Layout(1, 8, fsdp=False, sequence_parallel=False, remat="full")
    one, two = (
        measure(config, "llama3-8b", 32, t, 1, "bf16-mixed", jax.devices(), accumulate=k)
        for k in (1, 2)
    )
    # seen 19.08 GB, 0.4% below
    assert one["memory"] == pytest.approx(hand, rel=0.10)
    # seen 4.03 GB more: the accumulator and 0.01 GB (5.78 and 1.77 before AS_ON_GPU)
    assert 4 * n <= two["memory"] - one["memory"] <= 6 * n


def test_layouts_respect_heads_hosts_and_batch():
    configs = layouts(64, 8, n_heads=32, n_kv=8, batch=256, seq=8192)
    assert {c.tensor for c in configs} == {1, 2, 4, 8}
    assert all(c.data * c.tensor == 64 for c in configs)
    assert not [c for c in configs if c.tensor == 1 and c.sequence_parallel]
    assert len(configs) == 56  # 14 layouts x 4 remat policies
    assert {c.remat for c in configs} == {"none", "full", "dots", "minimal"}
    assert [c.label() for c in configs[:4]] == [
        "64x1 -",
        "64x1 remat",
        "64x1 remat=dots",
        "64x1 remat=minimal",
    ]
    assert Layout(8, 8, True, True, True) == Layout(8, 8, True, True, "full")  # old booleans
    assert {c.tensor for c in layouts(8, 8, n_heads=12, n_kv=6, batch=8, seq=64)} == {1, 2}


def test_planner_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "plan.json"
    payload = main(
        [
            "--model",
            "tiny",
            "--devices",
            "8",
            "--global-batch",
            "16",
            "--seq-len",
            str(SEQ),
            "--precision",
            "32-true",
            "--tensor",
            "4",
            "--remat",
            "dots",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] and saved["recommended"] == payload["recommended"]
    best = payload["recommended"]
    assert best["fits"] and best["tokens_per_s_per_device"] == max(
        r["tokens_per_s_per_device"] for r in payload["rows"] if r["fits"]
    )
    assert payload["usable_bytes_per_device"] == 80e9 * payload["hardware"]["mem_fraction"]
    for r in payload["rows"]:
        assert r["memory_bytes"] >= r["floor_bytes"] * 0.99  # compiled >= analytic floor
        assert r["fits"] == (r["memory_bytes"] <= payload["usable_bytes_per_device"])
    text = capsys.readouterr().out
    assert "ESTIMATES" in text and "* recommended:" in text and "usable" in text


def test_fits_compares_with_the_usable_memory(tmp_path, monkeypatch):
    """A row that needs 70 GB of an 80 GB device does not fit under jax's default 75%
    preallocation (60 GB), and does at --mem-fraction 0.9 (72 GB). The compiles are
    replaced by fixed figures: this checks the comparison, the header and the JSON."""
    from jtp.capacity import planner

    def fake_measure(config, *args, **kwargs):
        return dict.fromkeys(
            (
                "flops",
                "flops_bf16",
                "flops_float8",
                "bytes_tensor",
                "bytes_data",
                "bytes_both",
                "wire_tensor",
                "wire_data",
                "wire_both",
            ),
            1.0,
        ) | {"memory": 70e9}

    monkeypatch.setattr(planner, "measure", fake_measure)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    args = [
        "--model",
        "tiny",
        "--devices",
        "8",
        "--global-batch",
        "8",
        "--seq-len",
        str(SEQ),
        "--tensor",
        "8",
        "--json",
        str(tmp_path / "p.json"),
    ]
    default = main(args)
    assert default["usable_bytes_per_device"] == 60e9 and default["recommended"] is None
    assert not any(r["fits"] for r in default["rows"])
    roomier = main([*args, "--mem-fraction", "0.9"])
    assert roomier["usable_bytes_per_device"] == 72e9 and all(r["fits"] for r in roomier["rows"])


def test_the_library_function_returns_the_table_the_program_prints(capsys):
    """``jtp.capacity.search`` is the program without its flags: the same rows, the same
    recommendation and, formatted, the very text the program printed. Fewer devices than
    the request names is an error that says how to get them."""
    from jtp.capacity import Request, search

    request = _tiny_request("32-true")
    table = search(request, devices=jax.devices())
    payload = main(
        [
            "--model",
            "tiny",
            "--devices",
            "8",
            "--global-batch",
            "8",
            "--seq-len",
            str(SEQ),
            "--precision",
            "32-true",
            "--tensor",
            "8",
            "--remat",
            "none",
        ]
    )
    printed = capsys.readouterr().out
    assert [r["label"] for r in table.rows] == [r["label"] for r in payload["rows"]]
    assert [r["memory_bytes"] for r in table.rows] == [r["memory_bytes"] for r in payload["rows"]]
    assert table.recommended["label"] == payload["recommended"]["label"]
    assert table.format() + "\n" == printed
    with pytest.raises(jtp.InputError, match="JAX_NUM_CPU_DEVICES=64"):
        search(Request(model="tiny", devices=64), devices=jax.devices())
