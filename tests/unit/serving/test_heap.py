"""The serving heap policy: freed memory is reused, not faulted in anew (each case in a fresh process,
since the policy is process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

MIB_64 = 64 << 20
PAGES = MIB_64 // 4096

CYCLE = f"""
import ctypes, resource, sys
from fieldkube.serving.heap import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory(), "glibc refused a setting"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def cycle():  # what a request does with a large array: allocate, write, free
    block = libc.malloc({MIB_64})
    libc.memset(block, 1, {MIB_64})
    libc.free(block)

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_second_cycle(policy: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CYCLE, policy], capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.strip())


def test_a_freed_block_is_reused_without_page_faults() -> None:
    assert page_faults_of_second_cycle("reuse") < PAGES // 100


def test_without_the_policy_glibc_faults_every_page_in_again() -> None:
    """The cost the policy removes: glibc maps a 64 MiB block afresh and the kernel zero-fills each page
    (2 MiB pages where transparent huge pages are always on)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    pages = MIB_64 // (2 << 20) if thp.exists() and "[always]" in thp.read_text() else PAGES
    assert page_faults_of_second_cycle("system") >= pages * 9 // 10
