"""The benchmarks' one CPU timer: CPU time per call of a step, the least over a few passes.

CPU time, not wall time: this machine is shared, and another tenant's load stretches wall time far more
than the CPU a step uses. The least pass, not the mean: interference only ever adds time, so the least
disturbed pass is the closest to the step's own cost. `clock` is the process's CPU time by default (a
step whose work runs in library threads is counted whole), or `time.thread_time` for one thread's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


def cpu_ms(step: Callable[[], object], *, calls: int = 1, clock: Clock = time.process_time) -> float:
    """CPU ms per call of `step`, over one pass of `calls` calls."""
    began = clock()
    for _ in range(calls):
        step()
    return 1e3 * (clock() - began) / calls


def least_cpu_ms(
    step: Callable[[], object],
    *,
    passes: int = 3,
    calls: int = 1,
    clock: Clock = time.process_time,
    warm_up: bool = False,
) -> float:
    """Least over `passes` passes of the CPU ms per call of `step`; `warm_up` calls it once untimed first
    (steady state: caches filled, kernels chosen)."""
    if warm_up:
        step()
    best = math.inf
    for _ in range(passes):
        best = min(best, cpu_ms(step, calls=calls, clock=clock))
    return best
