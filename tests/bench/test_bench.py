"""The memory benchmark end to end at a small size (real CLI processes, not timed).

Per-device peak must sit at the floor, (params + grads + 2 AdamW moments) / N: at dim 512
the batch and activations add under 2% at TP=8, so 1.05 leaves room only for them."""

import argparse
import json

from jtp.cli.bench import main as bench_main


def test_memory_benchmark_small(tmp_path, capsys):
    out = tmp_path / "memory.json"
    payload = bench_main(["memory", "--dim", "512", "--steps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == payload["rows"]
    assert [r["config"] for r in rows] == ["TP=1", "TP=2", "TP=4", "TP=8", "2D fsdp 2x4"]
    for r in rows:
        if r["fsdp"]:
            assert r["ratio_to_floor_plus_gathered"] <= 1.05, r
        else:
            assert 1.0 <= r["ratio_to_floor"] <= 1.05, r
    printed = capsys.readouterr().out
    assert "| TP=8" in printed and "jtp/floor" in printed


def test_docs_figures_are_rendered_from_their_json():
    """Every figure table in docs/ and README is what the bench formatters make of the JSON
    in bench_results/ (python -m jtp.bench docs rewrites them; --check only compares), and no
    result is older than the code it measures (a GPU result, which a CPU cannot re-run, is
    only reported)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = bench_main(["docs", "--check", "--root", str(root)])
    assert out["stale"] == [] and out["results_stale"] == [], out
    assert all("GPU result" in n or "accepted" in n for n in out["results_noted"]), out


def _fake_repo(tmp_path, payload_extra=None, platform="cpu"):
    """A repository root with one benchmark module, one result of it and one page."""
    from jtp.bench import results

    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "bench_results").mkdir()
    (tmp_path / "jtp" / "bench").mkdir(parents=True)
    (tmp_path / "jtp" / "bench" / "overhead.py").write_text("from jtp.mesh import x\n")
    (tmp_path / "jtp" / "mesh.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("")

    def read(path):
        p = tmp_path / path
        return p.read_text() if p.is_file() else None

    payload = {
        "benchmark": "overhead",
        "machine": "m",
        "platform": platform,
        "dim": 8,
        "steps": 2,
        "repeats": 1,
        "best_steps_per_second": {"bare": 10.0, "trainer": 9.9},
        "ratio": 0.99,
        "check_replicas_ms_per_batch": 0.1,
        "provenance": {
            "commit": "abc1234def",
            "platform": platform,
            "machine": "m",
            "sources": results.source_hashes("overhead", read),
            "command": "python -m jtp.bench overhead --record",
            **(payload_extra or {}),
        },
    }
    (tmp_path / "bench_results" / "o.json").write_text(json.dumps(payload))
    doc = tmp_path / "docs" / "b.md"
    doc.write_text("<!-- bench:overhead bench_results/o.json -->\n```\nold\n```\n<!-- /bench -->\n")
    return doc


def test_docs_check_fails_on_a_hand_edited_table(tmp_path):
    import pytest

    doc = _fake_repo(tmp_path)
    with pytest.raises(SystemExit):
        bench_main(["docs", "--check", "--root", str(tmp_path)])
    bench_main(["docs", "--root", str(tmp_path)])
    assert "| ratio (target>=0.97) |     0.990 |" in doc.read_text()
    assert "Measured on: m, jtp abc1234." in doc.read_text()
    bench_main(["docs", "--check", "--root", str(tmp_path)])


def test_docs_check_fails_when_the_measured_code_changed(tmp_path, capsys):
    """A module in the benchmark's import closure changes: the result is stale, and the check
    names the result, the page and the command that re-records it, in both modes."""
    import pytest

    _fake_repo(tmp_path)
    bench_main(["docs", "--root", str(tmp_path)])
    (tmp_path / "jtp" / "mesh.py").write_text("x = 2\n")  # imported by the benchmark
    for mode in (["--check"], []):
        with pytest.raises(SystemExit) as stop:
            bench_main(["docs", *mode, "--root", str(tmp_path)])
        assert stop.value.code == 1
        out = capsys.readouterr().out
        assert "bench_results/o.json (docs/b.md): measured at commit abc1234def" in out
        assert "jtp/mesh.py" in out and "re-record: python -m jtp.bench overhead --record" in out
    # the page says its figure is older than the code
    assert "has changed since" in (tmp_path / "docs" / "b.md").read_text()


def test_a_result_without_provenance_fails_the_check(tmp_path, capsys):
    import pytest

    _fake_repo(tmp_path)
    result = tmp_path / "bench_results" / "o.json"
    payload = json.loads(result.read_text())
    del payload["provenance"]
    result.write_text(json.dumps(payload))
    with pytest.raises(SystemExit):
        bench_main(["docs", "--root", str(tmp_path)])
    assert "has no provenance" in capsys.readouterr().out


def test_a_stale_gpu_result_is_reported_without_failing(tmp_path, capsys):
    """No GPU here to re-run it: the check says when it was measured and passes; a result a
    person marked ``accepted_stale`` is reported with the reason, too."""
    _fake_repo(tmp_path, platform="gpu")
    bench_main(["docs", "--root", str(tmp_path)])
    (tmp_path / "jtp" / "mesh.py").write_text("x = 2\n")
    bench_main(["docs", "--root", str(tmp_path)])  # the page now says the code moved since
    assert "has changed since" in (tmp_path / "docs" / "b.md").read_text()
    out = bench_main(["docs", "--check", "--root", str(tmp_path)])
    assert out["results_stale"] == [] and len(out["results_noted"]) == 1
    assert "GPU result measured at commit abc1234def" in capsys.readouterr().out

    _fake_repo(tmp_path / "b", payload_extra={"accepted_stale": "waits for a quiet machine"})
    bench_main(["docs", "--root", str(tmp_path / "b")])
    (tmp_path / "b" / "jtp" / "mesh.py").write_text("x = 2\n")
    bench_main(["docs", "--root", str(tmp_path / "b")])
    out = bench_main(["docs", "--check", "--root", str(tmp_path / "b")])
    assert out["results_stale"] == [] and "waits for a quiet machine" in out["results_noted"][0]


def test_source_set_is_the_import_closure():
    """generate's figures depend on the decoder and generation code, not on the trainer; the
    processes memory starts (python -m jtp.train) count; rendering and filing never do."""
    from jtp.bench.results import NOT_MEASURED, source_files

    gen = source_files("generate")
    assert {
        "jtp/bench/generate.py",
        "jtp/generation/generate.py",
        "jtp/models/llama.py",
        "jtp/parallel/parallelize.py",
    } <= set(gen)
    assert "jtp/training/trainer.py" not in gen
    assert {"jtp/cli/train.py", "jtp/training/trainer.py"} <= set(source_files("memory"))
    assert "jtp/capacity/planner.py" in source_files("capacity")
    for kind in ("generate", "memory", "gpu", "text", "capacity"):
        assert not NOT_MEASURED & set(source_files(kind))


def test_ad_hoc_runs_never_write_committed_results(tmp_path, monkeypatch, capsys):
    """Without --record a result goes to $JTP_BENCH_DIR (else runs/bench/); a path into
    bench_results/ needs --record; --smoke never records; a GPU result is never replaced by a
    CPU one. Each refusal comes before any work (exit 2)."""
    import pytest

    from jtp.bench import results

    record = tmp_path / "bench_results"
    record.mkdir()
    gpu = record / "gpu.json"
    gpu.write_text(json.dumps({"benchmark": "gpu", "platform": "gpu"}))
    before = gpu.read_bytes()
    monkeypatch.setattr(results, "RECORD_DIR", record)
    monkeypatch.setenv("JTP_BENCH_DIR", str(tmp_path / "adhoc"))
    refusals = {
        ("gpu", "--smoke", "--record"): "--smoke never records",
        ("gpu", "--smoke", "--json", str(gpu)): "pass --record",
        ("lora", "--json", str(record / "lora_memory.json")): "pass --record",
        ("memory", "--plot", str(record / "memory.png")): "pass --record",
        ("gpu", "--smoke", "--json", str(gpu), "--record"): "--smoke never records",
    }
    for argv, message in refusals.items():
        with pytest.raises(SystemExit) as stop:
            bench_main(list(argv))
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    # a CPU result written over a GPU one, wherever it goes
    args = argparse.Namespace(which="lora", json=str(gpu), command="python -m jtp.bench lora")
    with pytest.raises(SystemExit) as stop:
        results.write_result(args, {"benchmark": "lora", "platform": "cpu"})
    assert stop.value.code == 2 and "holds a GPU result" in capsys.readouterr().err
    assert gpu.read_bytes() == before


def test_gpu_benchmark_says_so_without_a_gpu_and_runs_its_code_path_with_smoke(
    tmp_path, capsys, monkeypatch
):
    """No GPU here: ``bench gpu`` exits 2 saying so. ``--smoke`` runs the whole path (the
    planner's layout choice, the bf16-mixed compiled step, timing, MFU fields, the table)
    on a tiny shape on CPU devices; its figures are labelled meaningless, and go to the
    ad-hoc results directory: the committed bench_results/gpu.json stays byte for byte.
    With two precisions the second (float8) runs the same layout in the same process: a
    row each, the float8 share of its matmul FLOPs read off its program (>= 90% at T = 32,
    none under bf16-mixed), the top-level figures the first's."""
    from pathlib import Path

    import pytest

    committed = Path(__file__).resolve().parents[2] / "bench_results" / "gpu.json"
    before = committed.read_bytes()
    monkeypatch.setenv("JTP_BENCH_DIR", str(tmp_path))

    with pytest.raises(SystemExit) as stop:
        bench_main(["gpu", "--json", str(tmp_path / "none.json")])
    assert stop.value.code == 2 and "no GPU here" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()
    out = tmp_path / "gpu.json"
    precisions = "bf16-mixed,transformer-engine"
    payload = bench_main(
        ["gpu", "--smoke", "--steps", "2", "--warmup", "1", "--precision", precisions]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert committed.read_bytes() == before
    assert payload["smoke"] and payload["platform"] == "cpu" and payload["mfu"] is None
    assert payload["layout"] == {"data": 2, "tensor": 4, "fsdp": True, "remat": "none"}
    assert payload["tokens_per_s_per_device"] > 0 and payload["precision"] == "bf16-mixed"
    assert payload["cudnn_attention_in_program"] is False  # XLA's path on CPU
    assert payload["bf16_matmul_flops_share"] >= 0.95
    bf16, fp8 = payload["precisions"]
    assert (bf16["precision"], fp8["precision"]) == ("bf16-mixed", "transformer-engine")
    assert bf16["matmul_flops_share"]["float8"] == 0.0
    assert fp8["matmul_flops_share"]["float8"] >= 0.9 and fp8["speedup"] > 0
    assert bf16["step_seconds"] == payload["step_seconds"]
    tried = payload["layouts_tried"]  # the whole-depth compile that chose the layout
    assert [(r["layout"], r["layers"], r["fits"]) for r in tried] == [("2x4 fsdp", 2, True)]
    assert payload["compile_seconds"] == tried[0]["compile_seconds"] > 0
    # the CPU planner's figure for this layout against the one the run compiled for its
    # devices: here both are CPU compiles of the same step, so they are equal
    assert payload["planner_check"]["ratio"] == 1.0
    checks = {a["implementation"]: a for a in payload["attention_check"]}
    assert list(checks) == ["xla", "blockwise"]  # no cuDNN without a GPU
    assert all(a["within_tolerance"] and not a["fused_kernel_in_program"] for a in checks.values())
    assert set(payload["versions"]) == {"jax", "jaxlib", "flax"}
    assert "SMOKE" in capsys.readouterr().out


def test_attention_benchmark_code_path_with_smoke(tmp_path, capsys):
    """``bench attention --smoke`` on CPU: every case (Llama's, Gemma's windows with the layer
    kind traced, the soft-cap, Gemma 3's scale) with XLA's and the blockwise kernel, both
    layer kinds of a windowed case checked against its own float32 reference, within
    tolerance; the Gemma-3-style model's bf16 step against float32, with its conditional
    (no cuDNN without a GPU)."""
    out = tmp_path / "attention.json"
    payload = bench_main(["attention", "--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = payload["rows"]
    assert {r["implementation"] for r in rows} == {"xla", "blockwise"}
    windowed = [r for r in rows if "sliding" in r["case"]]
    assert {r["layer"] for r in windowed} == {"sliding", "global"}
    assert all(r["within_tolerance"] and not r["fused_kernel_in_program"] for r in rows)
    model = payload["gemma_model"]
    assert model["within_tolerance"] and model["conditional_in_program"]
    assert not model["fused_kernel_in_program"]
    assert "Gemma-3-style model" in capsys.readouterr().out


def test_compile_benchmark_code_path_at_tiny_sizes(tmp_path, capsys):
    """``bench compile`` end to end at 2 layers of width 128, two remat policies (not timed:
    the real run's figures are bench_results/compile.json); its JSON renders in the docs'
    format."""
    from jtp.bench.docs import RENDERERS

    out = tmp_path / "compile.json"
    payload = bench_main(
        [
            "compile",
            "--depths",
            "2",
            "--dim",
            "128",
            "--seq",
            "16",
            "--policy-layers",
            "2",
            "--remat",
            "none,full",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert [r["layers"] for r in payload["rows"]] == [2]
    assert all(r["scanned_s"] > 0 and r["unrolled_s"] > 0 for r in payload["rows"])
    by = {r["remat"]: r for r in payload["policies"]}
    assert list(by) == ["none", "full"]
    assert by["full"]["flops_per_device"] > by["none"]["flops_per_device"]
    assert by["full"]["scanned_peak_bytes_per_device"] < by["none"]["scanned_peak_bytes_per_device"]
    table = RENDERERS["compile"](payload)
    assert "| layers | scanned s |" in table and "| full    |" in table
    assert table in capsys.readouterr().out


def test_generate_benchmark_code_path_at_tiny_sizes(tmp_path):
    """``bench generate`` end to end on a tiny model (its figures: bench_results/generate.json):
    the cache is split over the 8 devices (8 kv heads over tensor 8), and its size is
    layers x 2 (k, v) x rows x slots x kv heads x head dim x 4 bytes."""
    from jtp.bench.docs import RENDERERS

    out = tmp_path / "generate.json"
    payload = bench_main(
        [
            "generate",
            "--dim",
            "64",
            "--layers",
            "2",
            "--prompt",
            "8",
            "--new",
            "8",
            "--batches",
            "1,8",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    for r in payload["rows"]:
        assert r["rows_computed"] == r["batch"] and r["decode_tokens_per_s"] > 0
        assert r["cache_bytes"] == 2 * 2 * r["batch"] * 16 * 8 * 4 * 4  # 16 slots, E = 4
        assert r["cache_bytes_per_device"] * 8 == r["cache_bytes"]
    assert "| 8 |" in RENDERERS["generate"](payload)


def test_a_result_records_what_it_measured(tmp_path):
    """Provenance: the commit (and whether the measured sources differed from it), the hash
    of the benchmark's source set as it is now, versions, machine, device, date, command."""
    import subprocess

    import jax

    from jtp.bench.results import REPO, source_hashes

    out = tmp_path / "g.json"
    payload = bench_main(
        [
            "generate",
            "--dim",
            "32",
            "--layers",
            "1",
            "--prompt",
            "4",
            "--new",
            "2",
            "--batches",
            "1",
            "--json",
            str(out),
        ]
    )
    prov = json.loads(out.read_text())["provenance"]
    assert prov == payload["provenance"]
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert prov["commit"] == head and isinstance(prov["dirty"], bool)
    assert prov["sources"] == source_hashes("generate")
    assert prov["versions"]["jax"] == jax.__version__ and set(prov["versions"]) == {
        "jax",
        "jaxlib",
        "flax",
    }
    assert prov["platform"] == "cpu" and prov["device_kind"] == "cpu" and "cores" in prov["machine"]
    assert prov["date"].endswith("Z") and prov["command"].startswith("python -m jtp.bench generate")


def test_lora_benchmark_code_path_on_the_tiny_preset(tmp_path):
    """``bench lora`` end to end on the tiny preset (its figures: bench_results/lora_memory.json):
    the LoRA step's arguments are smaller (no optimizer state for the base)."""
    from jtp.bench.docs import RENDERERS

    out = tmp_path / "lora.json"
    payload = bench_main(
        ["lora", "--preset", "tiny", "--rank", "4", "--seq-len", "16", "--json", str(out)]
    )
    full, adapted = payload["rows"]
    assert (full["lora_rank"], adapted["lora_rank"]) == (0, 4)
    assert adapted["arguments_gib"] < full["arguments_gib"]
    assert "LoRA r = 4" in RENDERERS["lora"](payload)


def test_moe_benchmark_code_path_at_tiny_sizes(tmp_path, monkeypatch):
    """``bench moe`` end to end on one block (its figures: bench_results/moe.json), on its
    three placements over 8 devices (the one-device and dense rows run the same code): only
    capacity rows drop pairs; the expert axis moves, per device and step, the padded
    exchange's worst-case buffers (2 all-to-alls forward, 2 backward, each X x M rows of
    D float32: M = 16 tokens x k 2 on each device, X = 4, D = 256) plus the (X, E) int32
    counts, and the capacity rows C pairs per expert."""
    from jtp.bench import moe
    from jtp.bench.docs import RENDERERS

    placed = [layout for layout in moe.LAYOUTS if "data" in layout and not layout.get("dense")]
    assert len(placed) == 3
    monkeypatch.setattr(moe, "LAYOUTS", tuple(placed))
    out = tmp_path / "moe.json"
    args = "moe --layers 1 --seq-len 16 --repeats 1 --json".split()
    payload = bench_main([*args, str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = {(r["layout"], tuple(r["mesh"].values())): r for r in payload["rows"]}
    for (layout, _), r in rows.items():
        assert (r["dropped_fraction"] > 0) == ("capacity" in layout), layout
        assert 0 <= r["dropped_fraction"] <= 1 and r["step_seconds"] > 0
    x, m, d = 4, 16 * 2, 256
    dropless = rows[("MoE dropless", (2, 4, 1))]["bytes_by_axes"]
    assert dropless["expert"] == 4 * x * m * d * 4 + x * 8 * 4
    assert "tensor" not in dropless
    assert "expert" not in rows[("MoE dropless", (2, 1, 4))]["bytes_by_axes"]
    assert "| MoE capacity 1.25, data 2 x expert 4 |" in RENDERERS["moe"](payload)


def test_gpu_mfu_of_a_moe_model_counts_its_active_parameters():
    """``bench gpu``'s FLOPs per token take a MoE model's active parameters (k of E experts):
    Mixtral-8x7B's 12.9B of 46.7B, so 6 x (active - embedding) + the attention term; a
    dense model's are all of them."""
    from jtp.bench.gpu import flops_per_token
    from jtp.models.llama import PRESETS

    for name in ("mixtral-8x7b", "llama3-8b"):
        c = PRESETS[name]
        attention = 12 * c.n_layers * c.n_heads * c.head_dim * 4096
        want = 6.0 * (c.num_active_params() - c.vocab_size * c.dim) + attention
        assert flops_per_token(c, 4096) == want
    mixtral = PRESETS["mixtral-8x7b"]
    assert 12.8e9 < mixtral.num_active_params() < 13.0e9 < 46e9 < mixtral.num_params()


def test_context_benchmark_code_path_at_tiny_sizes(tmp_path):
    """``bench context`` end to end on one block at 256 tokens, blockwise, C = 1 and 2 (its
    figures: bench_results/context.json). The first step's loss is the same on both (one
    sequence, cut in pieces: float32 sums in another order, 1e-5); each device of C = 2
    moves over "context" exactly the K and V gathers (2 x (1, 256, 2, 32) float32), their
    reduce-scatters, the (256,) int32 positions and the gradients' all-reduce (the
    parameters' bytes + the loss's 4); the balanced tiles are equal; the search for the
    longest sequence stops at its cap."""
    import jax
    from flax import nnx

    from jtp.bench.context import model_config
    from jtp.bench.docs import RENDERERS
    from jtp.models.llama import Llama

    out = tmp_path / "context.json"
    args = "context --seq-len 256 --layers 1 --repeats 1 --sizes 1,2 --kernels blockwise"
    args += " --budget-mib 64 --search-from 256 --max-seq-len 256 --json"
    payload = bench_main([*args.split(), str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    one, two = payload["rows"]
    assert abs(one["loss"] - two["loss"]) <= 1e-5 and one["context_mib"] == 0
    model = nnx.eval_shape(lambda: Llama(model_config(1, 256, "xla"), rngs=nnx.Rngs(0)))
    params = sum(v.size * 4 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    kv = 256 * 2 * 32 * 4
    assert two["context_mib"] * 2**20 == 4 * kv + 256 * 4 + params + 4
    assert payload["balance"][1]["tiles_balanced"] == [1, 1]
    assert [r["seq_len"] for r in payload["longest"]] == [256, 256]
    assert "| blockwise | 2 |" in RENDERERS["context"](payload)
