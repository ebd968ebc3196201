"""Host memory on CPU: keep what a step frees for the next step, as XLA's GPU allocator does.

XLA's CPU runtime allocates an execution's temporaries (activations, the logits and their
gradient: hundreds of MiB a device) with ``malloc`` at each run of a program and frees them
when it ends. glibc serves a block that large with a fresh ``mmap`` (above 32 MiB always)
and gives it back with ``munmap``, so every training step faults in and zeroes all its
temporaries again: about a tenth of a CPU step's time (``docs/performance.md``, "Where a CPU
training step's time goes"). On a GPU, XLA's BFC allocator keeps device memory for reuse
and none of this happens.

:func:`retain_host_memory` makes glibc do the same on the host: one arena (XLA's device
threads allocate from it too, so their blocks can come from the heap), no ``mmap`` for large
blocks and no trimming of the heap's top, so a freed step's temporaries are reused by the
next step. The process's resident memory then stays at its peak, which is what a
training process reaches every step anyway.

``python -m jtp.train``, ``jtp.eval``, ``jtp.generate`` and ``jtp.bench`` call it before
jax starts when jax runs on CPU only (no CUDA plugin, or ``JAX_PLATFORMS`` without a GPU);
your own script can call it first thing. It changes nothing where glibc is not the C
library, where the environment already sets glibc's malloc options (``GLIBC_TUNABLES`` with
``glibc.malloc.*``, ``MALLOC_ARENA_MAX`` and the like: the user's choice stands), or where
``JTP_HOST_MEMORY=system`` asks for glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

from jtp.xla_flags import cuda_jax_installed

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (mallopt parameter, its GLIBC_TUNABLES name, value, why): what retain_host_memory sets.
SETTINGS: tuple[tuple[int, str, int, str], ...] = (
    (M_ARENA_MAX, "arena_max", 1, "one arena: the device threads' blocks come from the heap too"),
    (M_MMAP_MAX, "mmap_max", 0, "no mmap for large blocks: a freed block stays for the next step"),
    (M_TRIM_THRESHOLD, "trim_threshold", 2**31 - 1, "never give the heap's free top back"),
)
RETAINED = "retained (one arena, no mmap, no trim)"  # setting() once they are applied
OPT_OUT = "JTP_HOST_MEMORY"
USER_SETTINGS = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def left_to_environment(environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """What the host allocator is left to here, as :func:`setting` records it (whose
    settings, and why), or None when jtp may set it."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").lower() == "system":
        return f"glibc's defaults ({OPT_OUT}=system)"
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return f"the environment's (GLIBC_TUNABLES={tunables})"
    given = [name for name in USER_SETTINGS if name in env]
    if given:
        return f"the environment's ({given[0]}={env[given[0]]})"
    if platform.libc_ver()[0] != "glibc":
        return "the C library's own (not glibc)"
    return None


_setting = "glibc's defaults"  # what this process runs with: setting() reports it


def retain_host_memory(*, force: bool = False) -> bool:
    """Make glibc keep freed host memory for reuse (see the module's docstring); call it
    before jax starts its CPU backend, whose threads take their arena at their first
    allocation. Only where jax runs on CPU alone, unless ``force``. Returns whether the
    settings were applied."""
    global _setting
    left_to = left_to_environment()
    if left_to is None and not force and cuda_jax_installed():
        left_to = "glibc's defaults (jax may run on GPUs)"
    if left_to is not None:
        _setting = left_to
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = all(mallopt(param, value) == 1 for param, _, value, _ in SETTINGS)
    _setting = RETAINED if applied else "glibc's defaults (mallopt refused)"
    return applied


def setting() -> str:
    """This process's host allocator, as results record it: :data:`RETAINED`, glibc's
    defaults and why, or the environment's settings."""
    return _setting


def glibc_tunables() -> str:
    """The same settings as a ``GLIBC_TUNABLES`` value, for a process jtp does not start
    itself (``python -m jtp.bench lightning`` gives it to Lightning's processes)."""
    return ":".join(f"glibc.malloc.{name}={value}" for _, name, value, _ in SETTINGS)
