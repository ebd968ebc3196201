"""``python -m jtp.bench lightning`` without torch and without a compile: jtp's side is the
example's model, layout, batch and numerics; the runner's line is parsed; the step figures
and the table come from the JSON; a missing Lightning environment is a one-line exit 2.
(The two whole processes themselves run only in the benchmark: minutes, and torch.)"""

import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import pytest
from flax import nnx

from jtp.bench.docs import RENDERERS
from jtp.bench.lightning import (
    jtp_command,
    jtp_flags,
    parse_runner_output,
    step_figures,
    summarise,
)
from jtp.bench.results import REPO, result_name
from jtp.cli.bench import main as bench_main
from jtp.cli.train import main as train_main
from jtp.models.llama import PRESETS, Llama
from jtp.training.trainer import Trainer


@pytest.fixture
def fits(monkeypatch):
    """``Trainer.fit`` replaced: main() runs through, recording (trainer, task)."""
    runs = []
    monkeypatch.setattr(Trainer, "fit", lambda self, task, resume: runs.append((self, task)))
    return runs


def test_jtp_side_is_the_examples_layout_batch_and_numerics(fits, tmp_path):
    """The example: 2 x 2, TP + FSDP2 + sequence + loss parallel, checkpointing on every
    block, 128 rows of 128 tokens in 8 per data-parallel rank (16 a step) for 2 epochs (16
    steps), torch's AdamW (lr 3e-3, weight decay 0.01), float32; every step logged."""
    metrics = tmp_path / "m.json"
    cmd = jtp_command("python", str(metrics), str(tmp_path))
    assert cmd[:3] == ["python", "-m", "jtp.train"]
    train_main(cmd[3:])
    ((trainer, task),) = fits
    c, o = task.config, trainer.options
    assert json.loads(metrics.read_text())["mesh"] == {"data": 2, "tensor": 2}
    assert trainer.strategy.fsdp and c.fsdp and c.sequence_parallel and c.loss_parallel
    assert (c.preset, c.remat, c.seq_len, c.samples, c.batch_size) == (
        "lightning-46m",
        "full",
        128,
        128,
        16,
    )
    assert (c.lr, c.weight_decay, o.precision) == (3e-3, 0.01, "32-true")
    assert (o.max_epochs, c.samples // c.batch_size, o.log_every_n_steps) == (2, 8, 1)
    assert "--no-compilation-cache" in cmd  # a first run: every program compiled


def test_the_repeated_run_differs_only_in_its_compilation_cache(tmp_path):
    """``jtp_cached``: the same command, the benchmark's own cache directory in place of
    none; everything the step computes stays the same."""
    first = jtp_command("python", "m.json", str(tmp_path))
    again = jtp_command("python", "m.json", str(tmp_path), cache=str(tmp_path / "xla"))
    assert [a for a in again if a not in first] == [f"--compilation-cache={tmp_path / 'xla'}"]
    assert [a for a in first if a not in again] == ["--no-compilation-cache"]
    assert len(first) == len(again)


def test_the_record_names_both_of_jtps_commands():
    """The committed result says what each jtp side ran: the first run's command and the
    repeated run's, which differ only in the compilation cache (a directory the benchmark
    filled and removed, recorded as DIR)."""
    record = json.loads((REPO / "bench_results" / result_name("lightning")).read_text())
    first, again = record["jtp_command"].split(), record["jtp_cached_command"].split()
    assert first == ["python", "-m", "jtp.train", *jtp_flags()]
    assert again == ["python", "-m", "jtp.train", *jtp_flags("DIR")]
    assert [a for a in again if a not in first] == ["--compilation-cache=DIR"]


def test_the_preset_has_the_examples_parameter_count():
    """The example's ModelArgs at dim 512, 4 layers, vocab 32000: SwiGLU width by its rule
    (int(2 * 4D / 3) rounded up to a multiple of 256), untied output, two norms per block
    and one at the end: 46,404,096 parameters, which the runner also counts in torch."""
    c = PRESETS["lightning-46m"]
    d, v, layers = 512, 32000, 4
    ffn = 256 * math.ceil(int(2 * 4 * d / 3) / 256)
    assert (c.dim, c.vocab_size, c.n_layers, c.ffn_hidden, c.tie_embeddings) == (
        d,
        v,
        layers,
        ffn,
        False,
    )
    model = nnx.eval_shape(lambda: Llama(c, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert params == 2 * v * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d == 46_404_096


def test_the_runners_line_and_the_step_figures():
    line = json.dumps({"params": 3, "step_times": [20.0, 23.0, 26.5, 29.5]})
    out = f"Epoch 1: 100%|###| 8/8\nLIGHTNING_TP_RESULT {line}\ndone\n"
    r = parse_runner_output(out)
    assert r["params"] == 3
    # first step: to step 1's end; the median over steps 2..4 of 3.0, 3.5, 3.0
    assert step_figures(r["step_times"]) == {"first_step_s": 20.0, "median_step_s": 3.0}
    with pytest.raises(ValueError, match="LIGHTNING_TP_RESULT"):
        parse_runner_output("Traceback ...\n")


def test_the_table_from_the_json():
    side = {"wall_s": 60.0, "cpu_s": 100.0, "median_step_s": 3.0, "first_step_s": 20.0}
    other = {"wall_s": 120.0, "cpu_s": 200.0, "median_step_s": 6.0, "first_step_s": 20.0}
    payload = {
        "model": {
            "dim": 512,
            "n_layers": 4,
            "n_heads": 8,
            "ffn_hidden": 1536,
            "vocab_size": 32000,
            "params_jtp": 46404096,
        },
        "steps": 16,
        "repeats": 3,
        "lightning_versions": {"torch": "2.13.0+cpu", "lightning": "2.6.6"},
        "runs": {s: [{"losses": [10.8, 9.6]}] for s in ("jtp", "lightning")},
        "median": {"jtp": side, "lightning": other},
        **summarise({"jtp": [side], "lightning": [other]}),
    }
    table = RENDERERS["lightning"](payload)
    assert "Llama 46.4M parameters" in table and "Lightning 2.6.6" in table
    assert "| jtp / Lightning " in table and "0.50 |" in table and "10.80 -> 9.60" in table
    assert "same host memory" not in table  # a result from before that side ran
    retained = {**other, "wall_s": 100.0}
    runs = {"jtp": [side], "lightning": [other], "lightning_retained": [retained]}
    payload["runs"]["lightning_retained"] = [{"losses": [10.8, 9.5]}]
    table = RENDERERS["lightning"]({**payload, **summarise(runs)})
    assert "jtp's host memory" in table and "10.80 -> 9.50" in table
    assert "| jtp / Lightning, same host memory" in table and "0.60 |" in table
    assert "repeated run" not in table
    cached = {**side, "wall_s": 54.0}
    runs["jtp_cached"] = [cached]
    payload["runs"]["jtp_cached"] = [{"losses": [10.8, 9.6]}]
    table = RENDERERS["lightning"]({**payload, **summarise(runs)})
    assert "| jtp, a repeated run: its compilation cache warm" in table
    assert "| jtp (a repeated run) / Lightning " in table and "0.45 |" in table


def test_without_a_lightning_environment_it_exits_2_saying_how(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIGHTNING_PYTHON", raising=False)
    argv = ["lightning", "--example-dir", str(tmp_path), "--json", str(tmp_path / "l.json")]
    with pytest.raises(SystemExit) as exit_:
        bench_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install torch==2.13.0 lightning" in err
    assert not (tmp_path / "l.json").exists()


def test_a_lightning_run_in_bf16_or_with_a_nan_is_refused(monkeypatch):
    """The runner swaps the example's bf16 FSDP2 policy for float32 and reports what its
    ``nn.Linear`` layers produced: anything but float32 (or a non-finite loss) is no
    comparison of the same numerics."""
    from jtp.bench import lightning

    def runner_says(**fields):
        r = {"finite": True, "linear_output_dtypes": ["torch.float32"], "losses": [1.0]}
        r["cpu_seconds"] = 7.0
        r["step_times"] = [2.0, 3.0, 4.0]
        line = lightning.RESULT_PREFIX + json.dumps({**r, **fields})
        monkeypatch.setattr(lightning, "_run", lambda cmd, env, t: (9.0, 1.0, line + "\n"))

    runner_says()
    run = lightning._lightning_run("py", "dir", 60)
    assert (run["median_step_s"], run["cpu_s"]) == (1.0, 7.0)
    runner_says(linear_output_dtypes=["torch.bfloat16", "torch.float32"])
    with pytest.raises(RuntimeError, match="bfloat16"):
        lightning._lightning_run("py", "dir", 60)
    runner_says(finite=False, losses=[float("nan")])
    with pytest.raises(RuntimeError, match="not all finite"):
        lightning._lightning_run("py", "dir", 60)


def test_a_warm_run_that_loaded_nothing_from_the_cache_is_refused(monkeypatch):
    """``jtp_cached`` times a repeated run only if jtp says it loaded its step from the
    cache: a cache that did not take (another jax, a full disk) would time a first run
    under the repeated run's name. The untimed run that fills the cache may load nothing."""
    from jtp.bench import lightning

    def jtp_says(hits: int) -> None:
        def run(cmd, env, timeout):
            metrics = {"step_times": [5.0, 7.5, 10.0], "losses": [10.8, 9.6]}
            metrics |= {"host_memory": "retained", "compile_cache_hits": hits}
            Path(cmd[cmd.index("--metrics-json") + 1]).write_text(json.dumps(metrics))
            assert any(a.startswith("--compilation-cache=") for a in cmd)
            return 40.0, 80.0, ""

        monkeypatch.setattr(lightning, "_run", run)

    jtp_says(0)
    assert lightning._jtp_run({}, 60, "/c", warm=False)["compile_cache_hits"] == 0
    with pytest.raises(RuntimeError, match="loaded nothing from its compilation cache"):
        lightning._jtp_run({}, 60, "/c")
    jtp_says(1)
    run = lightning._jtp_run({}, 60, "/c")
    assert (run["wall_s"], run["first_step_s"], run["median_step_s"]) == (40.0, 5.0, 2.5)


def test_a_hung_side_is_killed_with_what_it_started(tmp_path):
    """A process past ``--timeout`` is killed with its whole group (Lightning's ranks are
    its children): the benchmark stops with a message instead of hanging."""
    from jtp.bench import lightning

    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(600)"
    )
    with pytest.raises(RuntimeError, match="ran past 3 s: killed"):
        lightning._run([sys.executable, "-c", script], dict(os.environ), 3)
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init once killed
        if not os.path.exists(f"/proc/{child}") or "Z" in _state(child):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or "Z" in _state(child)
    assert lightning._run([sys.executable, "-c", "print('ok')"], dict(os.environ), 30)[2] == "ok\n"


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
