"""Force 8 CPU devices before anything imports jax (once, for the whole suite)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The programs' own persistent compilation cache stays off under tests (no writes to
# ~/.cache); tests/training/test_compilation_cache.py turns it on in its own processes.
os.environ["JTP_COMPILATION_CACHE"] = "off"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
assert len(jax.devices()) == 8, jax.devices()

# One compilation cache for the run's in-process compiles (the controller makes the
# directory, both xdist workers inherit it, the controller removes it at the end): many tests
# compile a program another test, or the same test, compiled before (a run and its resume,
# an export written twice), and load it instead. jax keys an entry by the program, its
# options and devices, so a hit is the same executable. Subprocesses the tests start decide
# their own cache by their flags. JTP_TEST_COMPILATION_CACHE=off: compile everything.
_CACHE_ENV = "JTP_TEST_XLA_CACHE"
_owns_cache = False
if os.environ.get("JTP_TEST_COMPILATION_CACHE", "on") != "off":
    import tempfile

    if _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jtp-tests-xla-")
        _owns_cache = True
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session, exitstatus):
    if _owns_cache:
        import shutil

        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


# The oracle tier (tests/oracle: transformers and PEFT run what jtp writes) needs the
# oracle interpreter, which `make test-oracle` creates and names; without it the directory
# is not collected at all (the main suite stays free of torch).
collect_ignore = [] if os.environ.get("JTP_ORACLE_PYTHON") else ["oracle"]
# The pages' code blocks run as a tier of their own (`make test-docs`: tests/docs), not in the
# main suite, whose own tests cover what the blocks call.
if not os.environ.get("JTP_DOC_SNIPPETS"):
    collect_ignore.append("docs")
