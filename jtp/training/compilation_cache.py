"""jax's persistent compilation cache for the programs: a resumed or repeated run loads its
compiled steps from disk instead of compiling them again.

On by default in the programs (``jtp train``, ``jtp capacity``, ``jtp bench``, ...), in
``$JTP_COMPILATION_CACHE`` if set, else ``~/.cache/jtp/xla`` (``$XDG_CACHE_HOME`` honoured).
Their ``--compilation-cache DIR`` picks another directory, ``--no-compilation-cache`` (or
``JTP_COMPILATION_CACHE=off``) turns it off. jax's defaults would skip what matters on CPU:
it caches only programs that took a second or more to compile; here every program is cached.
jax keys an entry by the program, its compile options, the devices and the jax/jaxlib
versions, so one directory serves every model, mesh and version safely.
"""

from __future__ import annotations

import os

ENV = "JTP_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "")


def default_dir() -> str | None:
    """``$JTP_COMPILATION_CACHE`` (None when it says off), else the user's cache dir."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jtp", "xla")


def enable(directory: str | None) -> str | None:
    """Point jax's persistent cache at ``directory`` (None: leave it off) and cache every
    program, however fast it compiled or small it is. Call before the first compile: jax
    sets its cache up once per process. Returns the directory."""
    if not directory:
        return None
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
