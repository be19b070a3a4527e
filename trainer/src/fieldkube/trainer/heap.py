"""The C heap policy of a training process: freed blocks stay in the process for the next step.

A training step allocates and frees the same large tensors (activations, gradients, a batch) every step.
glibc's default gives blocks above a threshold their own `mmap` and returns the top of the heap to the
kernel once 128 KiB of it is free, so each step faults the same memory in again and the kernel zeroes
every page of it: on this project's 2-core CPU host, `fieldkube-train` ran at 0.80-0.88 of a bare training
loop with the same model, batch and layout, and with freed memory kept at 0.96-1.11 (bench/README.md,
`make bench-train`). Keeping it costs nothing a step does not use anyway: the heap stays at the size of
the largest step, which it reaches on the first one.

Set at the start of each run, before its model and loader allocate, with `mallopt` (the same settings
as glibc's `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` and `MALLOC_TOP_PAD_`); loader worker
processes forked after it inherit it.
Other C libraries (musl, macOS) keep their own policy.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Blocks at least this large get their own mapping: glibc's upper limit for the setting on 64-bit
(larger values are refused), above any one activation of the built-in models at their default tiles."""

TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap kept rather than returned to the kernel."""

TOP_PAD = 64 << 20
"""Extra memory the heap grows by whenever it must grow, so a step's allocations do not each move it."""


def keep_freed_memory() -> bool:
    """Apply the policy where the C library is glibc; whether it was applied."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    applied = all(mallopt(option, value) == 1 for option, value in settings)
    if not applied:
        log.info("the C library refused the training heap policy; its default stays")
    return applied
