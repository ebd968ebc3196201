"""jtp.host_memory: on CPU the programs make glibc keep freed memory for the next step.

The mechanism is checked in fresh processes (the settings are process-wide, and a pytest
worker's threads already hold their arenas): a 256 MiB block malloc'd, written and freed
twice from a second thread, as XLA's device threads do with a step's temporaries. With
glibc's defaults each round maps fresh pages and faults every one in; after
``retain_host_memory`` the second round reuses the first's pages. That the programs apply
it is checked on ``python -m jtp.train`` itself (tests/training/test_compilation_cache.py);
that ``glibc_tunables()`` (what ``bench lightning`` gives Lightning's processes) does the
same from the environment, here.
"""

import subprocess
import sys

import pytest

from jtp import host_memory

PAGES = (256 << 20) // 4096

ROUNDS = """
import ctypes, resource, sys, threading
from jtp import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_host_memory(force=True), host_memory.setting()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(256 << 20)
        ctypes.memset(block, 1, 256 << 20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(*faults)
"""


def _second_round_faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no GLIBC_TUNABLES / MALLOC_* of the caller
    if mode == "tunables":  # what bench lightning gives Lightning's processes
        env["GLIBC_TUNABLES"] = host_memory.glibc_tunables()
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    first, second = map(int, out.stdout.split())
    assert first > PAGES // 2  # the first round always faults its pages in
    return second


@pytest.mark.skipif(host_memory.left_to_environment({}) is not None, reason="not glibc")
def test_a_freed_block_is_reused_not_faulted_in_again():
    assert _second_round_faults("system") > PAGES // 2  # glibc's defaults: mapped afresh
    assert _second_round_faults("retain") < PAGES // 20  # reused
    assert _second_round_faults("tunables") < PAGES // 20  # the same, set from outside


def test_the_environment_and_the_user_decide_first():
    """What is recorded says whose settings ran: glibc's defaults only where nobody set
    any, the environment's own (with their values) where the user did."""
    not_glibc = "the C library's own (not glibc)"
    assert host_memory.left_to_environment({}) in (None, not_glibc)
    assert host_memory.left_to_environment({"JTP_HOST_MEMORY": "system"}) == (
        "glibc's defaults (JTP_HOST_MEMORY=system)"
    )
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.left_to_environment(tunables) == (
        "the environment's (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)"
    )
    assert host_memory.left_to_environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) in (
        None,
        not_glibc,
    )
    assert host_memory.left_to_environment({"MALLOC_ARENA_MAX": "4"}) == (
        "the environment's (MALLOC_ARENA_MAX=4)"
    )
