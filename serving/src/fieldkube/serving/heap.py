"""The C heap policy of a serving process: keep freed memory for the next request instead of handing it
back to the kernel and faulting fresh pages in again.

Every request allocates the same few large arrays (decoded image, tiles, normalised batches, the model's
activations, maps) and frees them when it ends. glibc serves blocks over 128 KiB-32 MiB from fresh
`mmap`s and returns them with `munmap`, and shrinks its per-thread heaps as they empty; the next request
then page-faults every page back in, zero-filled by the kernel. Measured on a 2-core VM with the bench's
models (one torch thread): 12-25 % of the process's CPU was kernel time spent so, most of it inside the
forward pass. Serving every block from one heap that keeps up to `trim_threshold` free bytes removes
nearly all of it (bench/README.md, "Heap policy"). The price: the process keeps its peak heap size, less
that threshold, after a burst, as allocators built for servers (jemalloc, tcmalloc) also do.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the top of the heap kept for reuse before the rest is given back to the kernel."""


def reuse_freed_memory(trim_threshold: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Set glibc's heap to one arena, no per-block mmaps and a high trim threshold; False (and nothing
    changed) where the C library is not glibc. Call it before the process starts its threads: the arena
    limit holds for threads that have not yet allocated."""
    if platform.libc_ver()[0] != "glibc":
        log.info("heap policy left as the C library's own (not glibc)")
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold))
    applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    if not applied:
        log.warning("glibc refused a heap setting (mallopt); freed memory may be faulted in anew per request")
    return applied
