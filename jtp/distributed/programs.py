"""One program, one executable on every process."""

from __future__ import annotations

import jax


def same_programs_on_every_process() -> bool:
    """In a multi-process run, compile every program without Python source locations, so
    that each process's copy of a program is the same executable; whether it was needed.

    Why: with jax/jaxlib 0.12.1, a CPU program's cross-process collectives only meet when
    every process runs an executable with the same fingerprint, and the fingerprint covers
    the program's metadata, which names the Python call stack it was traced from (up to
    ``jax_traceback_in_locations_limit`` frames). Two processes that trace one program from
    different lines (process 0 gathers a tensor inside the file writer, the others in a
    loop beside it), or one that loads it from the persistent compilation cache while the
    other compiles it (a deserialised executable gets another fingerprint), wait for each
    other forever. Measured: a warm-cache second run and a two-process ``save_pretrained``
    both hung; with the locations left out both finish
    (``tests/distributed/test_watchdog_and_programs.py``). The cost: HLO dumps and profiles
    of a multi-process run show op names but no source lines.
    Call after ``jax.distributed.initialize`` and before tracing anything that crosses
    processes; calling it again is free.
    """
    if jax.process_count() == 1:
        return False
    if jax.config.jax_traceback_in_locations_limit != 0:
        jax.config.update("jax_traceback_in_locations_limit", 0)
    return True
