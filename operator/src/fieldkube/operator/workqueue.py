"""The reconciler's work queue: job keys to sync, each at most once in the queue and never in two workers.

Events only name a job; the sync reads the caches, so ten events for one job while it waits cost one sync.
A key added while a worker holds it is queued again when that worker is done. Urgent keys (a job without
its MPIJob yet) are served before the others, so a burst of new jobs gets its MPIJobs before the status
updates of the jobs already started. A sync that finds new jobs arriving parks its status write
(``park_if_held``): parked keys wait while an urgent key waits or while a hold lasts (the reconciler holds
them for a second after each MPIJob it creates), so in a burst of new jobs the API server's time goes to
creating their MPIJobs, and the statuses follow once the burst pauses; a key parked longer than
``max_park_s`` is served anyway, so a steady stream of new jobs delays statuses but never starves them.
Keys can also be added for later (pending timeouts, TTLs, retries after an error): one heap of deadlines
serves every job, instead of a timer per job.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from typing import Generic, TypeVar

K = TypeVar("K")

DEFAULT_MAX_PARK_S = 30.0
DEFAULT_WORKERS = 16
"""Sync threads by default. A sync is mostly waiting on the API server (an MPIJob POST, a status PATCH), so
threads, not cores, set the pace: with 8, a burst of 1,000 TrainingJobs from 4 clients (about 27 per
second on the 2-core bench VM) left the last MPIJob 7.8 s behind the last job; with 16, 0.9-2.7 s in three
runs (bench/README.md, bench-operator)."""


class WorkQueue(Generic[K]):
    def __init__(self, max_park_s: float = DEFAULT_MAX_PARK_S) -> None:
        self.max_park_s = max_park_s
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._urgent: deque[K] = deque()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._parked: set[K] = set()
        self._parked_since = 0.0
        self._overdue: set[K] = set()
        self._hold_until = 0.0
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

    def hold(self, seconds: float) -> None:
        """Keep parked keys waiting for at least ``seconds`` more (new jobs are arriving)."""
        with self._cond:
            self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    def holding(self) -> bool:
        """Whether parked keys wait now (an urgent key waits, or a hold lasts)."""
        with self._cond:
            return self._holding(time.monotonic())

    def _holding(self, now: float) -> bool:
        if self._parked and now - self._parked_since >= self.max_park_s:
            return False
        return bool(self._urgent) or now < self._hold_until

    def park_if_held(self, key: K) -> bool:
        """Park ``key`` (True) if parked keys wait now; False: go on. A key released because it waited
        ``max_park_s`` goes on once, though the hold lasts, or a long burst would park it again forever."""
        with self._cond:
            if key in self._overdue:
                self._overdue.discard(key)
                return False
            now = time.monotonic()
            if not self._holding(now):
                return False
            if not self._parked:
                self._parked_since = now
            self._parked.add(key)
            self._cond.notify()  # a waiting worker recomputes when to release the parked keys
            return True

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
                if self._parked and not self._holding(now):
                    if self._urgent or now < self._hold_until:  # released by max_park_s, not by the hold
                        self._overdue = set(self._parked)  # marks older than one release are dropped
                    for parked in self._parked:
                        self._add(parked)
                    self._parked.clear()
                if self._urgent or self._queue:
                    key = (self._urgent or self._queue).popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                self._cond.wait(self._next_wake(now))

    def _next_wake(self, now: float) -> float | None:
        """Seconds until the next deadline or the parked keys' release (None: until notified)."""
        wakes = [self._later[0][0]] if self._later else []
        if self._parked:
            wakes.append(min(self._hold_until, self._parked_since + self.max_park_s))
        return max(0.0, min(wakes) - now) if wakes else None

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
