"""The reconciler's work queue: job keys to sync, each at most once in the queue and never in two workers.

Events only name a job; the sync reads the caches, so ten events for one job while it waits cost one sync.
A key added while a worker holds it is queued again when that worker is done. Urgent keys (a job without
its MPIJob yet) are served before the others, so a burst of new jobs gets its MPIJobs before the status
updates of the jobs already started; a sync that finds new jobs waiting parks its status write
(``add_when_no_urgent``) until none waits, so the workers' time goes to creating MPIJobs first. Keys can
also be added for later (pending timeouts, TTLs, retries after an error): one heap of deadlines serves
every job, instead of a timer per job.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from typing import Generic, TypeVar

K = TypeVar("K")

DEFAULT_WORKERS = 16
"""Sync threads by default. A sync is mostly waiting on the API server (an MPIJob POST, a status PATCH), so
threads, not cores, set the pace: with 8, a burst of 1,000 TrainingJobs from 4 clients (about 27 per
second on the 2-core bench VM) left the last MPIJob 7.8 s behind the last job; with 16, 0.9-2.7 s in three
runs (bench/README.md, bench-operator)."""


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._urgent: deque[K] = deque()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._parked: set[K] = set()
        self._later: list[tuple[float, int, K]] = []
        self._sequence = 0
        self._closed = False

    def add(self, key: K, urgent: bool = False) -> None:
        with self._cond:
            self._add(key, urgent)

    def _add(self, key: K, urgent: bool = False) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            (self._urgent if urgent else self._queue).append(key)
            self._cond.notify()
        elif urgent and key in self._queue:  # queued as ordinary, now urgent: move it ahead
            self._queue.remove(key)
            self._urgent.append(key)

    def urgent_waiting(self) -> bool:
        """Whether an urgent key waits for a worker."""
        with self._cond:
            return bool(self._urgent)

    def add_when_no_urgent(self, key: K) -> None:
        """Add ``key`` once no urgent key waits (at once when none does)."""
        with self._cond:
            if self._urgent:
                self._parked.add(key)
            else:
                self._add(key)

    def add_after(self, key: K, seconds: float) -> None:
        """Add ``key`` once ``seconds`` have passed (at once when not positive)."""
        if seconds <= 0:
            self.add(key)
            return
        with self._cond:
            self._sequence += 1
            heapq.heappush(self._later, (time.monotonic() + seconds, self._sequence, key))
            self._cond.notify()

    def get(self) -> K | None:
        """The next key to sync (blocking); None once the queue is closed. Call done(key) after."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._add(heapq.heappop(self._later)[2])
                if self._parked and not self._urgent:
                    for parked in self._parked:
                        self._add(parked)
                    self._parked.clear()
                if self._urgent or self._queue:
                    key = (self._urgent or self._queue).popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                self._cond.wait(self._later[0][0] - now if self._later else None)

    def done(self, key: K) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._add(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._urgent) + len(self._parked)
