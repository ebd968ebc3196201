"""The memory benchmark end to end at a small size (real CLI processes, not timed).

Per-device peak must sit at the floor, (params + grads + 2 AdamW moments) / N: at dim 512
the batch and activations add under 2% at TP=8, so 1.05 leaves room only for them."""

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
