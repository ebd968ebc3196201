"""Force 8 CPU devices before anything imports jax (once, for the whole suite)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The programs' persistent compilation cache stays off under tests (no writes to ~/.cache,
# no state shared between tests); tests/cli/test_compilation_cache.py turns it on in its own.
os.environ["JTP_COMPILATION_CACHE"] = "off"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
assert len(jax.devices()) == 8, jax.devices()

# The oracle tier (tests/oracle: transformers and PEFT run what jtp writes) needs the
# oracle interpreter, which `make test-oracle` creates and names; without it the directory
# is not collected at all (the main suite stays free of torch).
collect_ignore = [] if os.environ.get("JTP_ORACLE_PYTHON") else ["oracle"]
# The pages' code blocks run as a tier of their own (`make test-docs`: tests/docs), not in the
# main suite, whose own tests cover what the blocks call.
if not os.environ.get("JTP_DOC_SNIPPETS"):
    collect_ignore.append("docs")
