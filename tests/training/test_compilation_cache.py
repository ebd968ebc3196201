"""The programs' persistent compilation cache: where it lives, how it is turned off, and that
a second process loads what the first compiled (conftest turns it off for the other tests)."""

import json
import os

from processes import clean_env, start_process, stop_all

from jtp import host_memory
from jtp.cli.train import build_parser
from jtp.training import compilation_cache

RUN = (
    "--devices 8 --model llama --preset tiny --data-parallel 2 --tensor-parallel 4 --fsdp"
    " --sequence-parallel --loss-parallel --max-steps 2 --no-progress"
).split()


def test_directory_from_the_environment_and_flags(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_dir() == str(tmp_path / "jtp" / "xla")  # on by default
    monkeypatch.setenv(compilation_cache.ENV, "/somewhere")
    assert compilation_cache.default_dir() == "/somewhere"
    assert build_parser().parse_args([]).compilation_cache == "/somewhere"
    assert build_parser().parse_args(["--no-compilation-cache"]).compilation_cache is None
    assert build_parser().parse_args(["--compilation-cache", "D"]).compilation_cache == "D"
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.default_dir() is None
    assert compilation_cache.enable(None) is None  # off: jax's config untouched


def _run(tmp_path, tag, cache, **env):
    metrics = tmp_path / f"{tag}.json"
    proc = start_process(
        [*RUN, "--compilation-cache", str(cache), "--metrics-json", str(metrics)],
        tmp_path / f"{tag}.log",
        env={**clean_env(), **env},
    )
    try:
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{tag}.log").read_text()[-3000:]
    finally:
        stop_all([proc])
    return json.loads(metrics.read_text())


def test_a_second_process_loads_the_first_ones_programs(tmp_path):
    """The first run writes the entries (every program, small CPU ones too); an identical
    second run in a new process compiles nothing: it adds no entry (each program is a hit)
    and its train step is loaded, not compiled (jax's cache-hit events during the trainer's
    compile; wall time would only infer it, and two test workers make it noisy).

    The first run keeps freed host memory for reuse, as shipped on CPU (jtp.host_memory);
    the second asks for glibc's defaults: the allocator changes no result."""
    cache = tmp_path / "cache"
    first = _run(tmp_path, "first", cache)
    entries = sorted(os.listdir(cache))
    assert len(entries) >= 2  # the sharded init and the train step at least
    second = _run(tmp_path, "second", cache, JTP_HOST_MEMORY="system")
    assert sorted(os.listdir(cache)) == entries
    assert first["compile_cache_hits"] == 0 and second["compile_cache_hits"] >= 1
    assert second["losses"] == first["losses"]  # the loaded program computes the same
    assert first["host_memory"] == host_memory.RETAINED
    assert second["host_memory"] == "glibc's defaults (JTP_HOST_MEMORY=system)"


def test_afresh_compiles_what_the_warm_cache_holds(tmp_path):
    """``jtp.analysis.compiling.afresh``: inside it a program the persistent cache holds is
    compiled again (no cache hit: what ``bench compile`` times, and what XLA's dumps need);
    after it the cache loads the program again."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from jtp.analysis import compiling
    from jtp.training.compile import persistent_cache_hits

    def compile_fresh_lowering():  # a Lowered keeps its compiled program: lower anew
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0).lower(jnp.zeros((7, 13))).compile()

    was = jax.config.jax_compilation_cache_dir
    compilation_cache.enable(str(tmp_path / "cache"))
    jax_cache.reset_cache()
    try:
        compile_fresh_lowering()  # written to the cache
        with persistent_cache_hits() as warm:
            compile_fresh_lowering()
        with persistent_cache_hits() as fresh, compiling.afresh():
            compile_fresh_lowering()
        with persistent_cache_hits() as after:
            compile_fresh_lowering()
    finally:
        jax.config.update("jax_compilation_cache_dir", was)
        jax_cache.reset_cache()
    assert (len(warm), len(fresh), len(after)) == (1, 0, 1)
