"""``python -m jtp.generate``: a Hugging Face fixture gives transformers' tokens, a training
checkpoint restores and continues as ``jtp.generate`` does on it, a text prompt goes
through a tokenizer, timings are reported apart, and bad input is refused before jax runs
anything."""

import json
import os
from pathlib import Path

import pytest

import jtp
from jtp.cli.generate import main
from jtp.cli.train import main as train_main

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")


def test_hf_fixture_gives_transformers_tokens(tmp_path):
    with open(os.path.join(FIXTURES, "qwen3", "generate.json")) as f:
        ref = json.load(f)
    ids = [",".join(map(str, p)) for p in ref["prompts"]]
    out = tmp_path / "g.json"
    r = main(
        [
            "--hf",
            os.path.join(FIXTURES, "qwen3"),
            "--devices",
            "8",
            "--tensor-parallel",
            "8",
            *[a for i in ids for a in ("--prompt-ids", i)],
            "--max-new-tokens",
            str(ref["max_new_tokens"]),
            "--json",
            str(out),
        ]
    )
    assert r["new_tokens"] == ref["new_tokens"]  # eos (2) from config.json stops prompt 3
    assert json.loads(out.read_text())["new_tokens"] == ref["new_tokens"]
    assert r["mesh"] == {"data": 1, "tensor": 8} and r["prefill_tokens_per_s"] > 0
    assert r["decode_tokens_per_s"] > 0 and r["cache_bytes"] > 0 and r["text"] is None


def test_checkpoint_and_text_prompt(tmp_path, capsys):
    """A tiny Llama trained 2 steps with a checkpoint; a word-level tokenizer of its
    vocabulary turns the text into ids; the continuation equals jtp.generate's on the same
    restored model, and the text printed is the tokenizer's decoding of it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    ck = str(tmp_path / "ck")
    train_main(
        [
            "--devices",
            "8",
            "--model",
            "llama",
            "--seq-len",
            "16",
            "--batch-size",
            "8",
            "--data-parallel",
            "2",
            "--tensor-parallel",
            "4",
            "--fsdp",
            "--max-steps",
            "2",
            "--checkpoint-dir",
            ck,
            "--no-progress",
            "--logger",
            "none",
            "--no-report-memory",
        ]
    )
    words = {f"w{i}": i for i in range(512)} | {"[UNK]": 0}
    tok = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    args = [
        "--checkpoint",
        ck,
        "--devices",
        "8",
        "--data-parallel",
        "2",
        "--tensor-parallel",
        "4",
        "--fsdp",
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--prompt",
        "w5 w9 w3",
        "--max-new-tokens",
        "6",
    ]
    r = main(args)
    from jtp.cli.generate import build_parser, load_model

    mesh = jtp.make_mesh(2, 4)
    model = load_model(build_parser().parse_args(args), mesh, 16)
    (want,) = jtp.generate(model, [[5, 9, 3]], max_new_tokens=6)
    assert r["prompts"] == [[5, 9, 3]] and r["new_tokens"] == [want]
    assert r["text"] == [" ".join(f"w{i}" for i in want)]
    assert r["text"][0] in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "hello"], "needs a tokenizer"),
        ([], "at least one --prompt"),
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--step", "3", "--prompt-ids", "1"], "--step picks a step"),
        (
            ["--context-parallel", "2", "--prompt-ids", "1"],
            "--context-parallel 2: generation does not split the sequence over 'context'",
        ),
    ],
)
def test_refusals_before_jax_runs(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        main(["--hf", str(tmp_path), *args])


def test_a_checkpoint_generates_on_another_tensor_size(tmp_path):
    """A training checkpoint records its mesh's kv replicas (2 kv heads on tensor 4: 2
    copies); generating on tensor 8 needs 4 and on tensor 2 none. The restored model is
    resolved for the generating mesh as training resolves a task, and gives the same greedy
    tokens on all three meshes (greedy argmax of equal float32 logits up to summation order:
    the fixture's logits are far from ties)."""
    import jtp
    from jtp.cli.generate import build_parser, load_model

    hf = str(Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama_kv2")
    ck = str(tmp_path / "ck")
    train_main(
        "--devices 8 --model llama --seq-len 16 --batch-size 8 --data-parallel 2 "
        f"--tensor-parallel 4 --max-steps 1 --checkpoint-dir {ck} --no-progress "
        f"--logger none --no-report-memory --hf {hf}".split()
    )
    tokens, copies = [], []
    for d, t in ((2, 4), (1, 8), (4, 2)):
        args = build_parser().parse_args(["--checkpoint", ck, "--prompt-ids", "5,9,3"])
        model = load_model(args, jtp.make_mesh(d, t), 16)
        copies.append(model.config.kv_replicas)
        tokens.append(jtp.generate(model, [[5, 9, 3]], max_new_tokens=6))
    assert copies == [2, 4, 1]
    assert tokens[0] == tokens[1] == tokens[2]
