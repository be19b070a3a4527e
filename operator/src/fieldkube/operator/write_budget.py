"""A budget for the operator's status writes across all jobs: a token bucket whose writes are reserved ahead.

Why: a status PATCH costs the API server about as much CPU as creating the TrainingJob (6-9 ms on the
2-core bench VM, CEL rules included) and every watcher an event. When 1,000 jobs arrive at once, writing
each job's status as soon as it changes made the API server spend 2.7x the CPU of the same MPIJobs applied
directly, and the jobs' creation waited behind the statuses. Under the budget a job whose write has no
token waits for a reserved slot; the sync at that slot writes the job's state then, so the short-lived
states between (no pods yet, pods pending) are never written, and MPIJob creation (never budgeted) keeps
the API server's time. A few jobs at a time stay within the burst and are written at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_WRITES_PER_SECOND = 20.0
DEFAULT_BURST = 50


class WriteBudget:
    """``writes_per_second`` on average, up to ``burst`` at once; each caller reserves its slot.

    The shape of client-go's rate limiter (``Reserve``): tokens may go below zero, and the caller is told
    how long to wait for the token it has taken, so waiting callers are spread over time instead of all
    retrying at the same instant.
    """

    def __init__(
        self,
        writes_per_second: float = DEFAULT_WRITES_PER_SECOND,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if writes_per_second <= 0 or burst < 1:
            raise ValueError(f"a write budget needs a positive rate and burst ({writes_per_second}, {burst})")
        self.rate, self.burst, self.clock = writes_per_second, float(burst), clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take one write's token; the seconds until it may be used (0: now)."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def cancel(self) -> None:
        """Give back a reserved token that was not used (the job was deleted, or had nothing to write)."""
        with self._lock:
            self._tokens = min(self.burst, self._tokens + 1.0)
