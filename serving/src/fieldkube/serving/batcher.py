"""Dynamic batching: tiles of one image and of concurrent requests share forward passes.

Requests enqueue their tiles; one worker per batcher takes up to a batch's limit of tiles (oldest first,
same model and tile size) as soon as the batch is full or the oldest tile has waited `max_batch_delay_s`.
The limit is `max_batch_size` tiles and `max_batch_pixels` pixels, one tile at least: a request's tile
size would otherwise set how many pixels a pass holds (`tile=1024` in batches of 4: 16 times the pixels,
and the activations' memory, of a default batch).
Worker threads do the rest so the event loop keeps serving: one prepares a batch (concatenates and
normalises it, on a GPU copies it there and queues its forward pass) while another waits for the
previous batch's maps, so the model never waits for the host between batches. The queue is bounded in
tiles (429 + Retry-After beyond it) and each request waits at most `request_timeout_s` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.served_model import PendingBatch, ServedModel

log = logging.getLogger(__name__)


class OverloadedError(RuntimeError):
    """The queue is full; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDownError(RuntimeError):
    """The server is stopping: work not yet started is refused so clients can go to another replica."""

    retry_after_s = 1


class InferenceTimeoutError(RuntimeError):
    """The request waited longer than the configured timeout."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Job:
    model: ServedModel
    tiles: np.ndarray  # (N, t, t, 3) uint8
    future: asyncio.Future[list[torch.Tensor]]
    enqueued_at: float = field(default_factory=time.perf_counter)
    next_tile: int = 0
    done_tiles: int = 0
    started: bool = False
    # (first tile, maps) per batch its tiles ran in: slices of the batches' maps, never copied
    pieces: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return id(self.model), self.tiles.shape[1:]

    @property
    def waiting(self) -> int:
        return self.tiles.shape[0] - self.next_tile


BATCHES_IN_FLIGHT = 2
"""Batches of one task between being taken from the queue and their maps being back: the one running and
the next, prepared meanwhile (more would only hold tiles that later requests could have joined)."""

REJECT_REASONS = ("queue_full", "pixel_budget", "timeout")
"""The ``reason`` label values of ``fieldkube_serve_rejected_requests_total``."""


class TileBatcher:
    """Batches tiles of one task's models; start() inside the event loop, stop() on shutdown."""

    def __init__(
        self,
        task: str,
        metrics: ServeMetrics,
        max_batch_size: int,
        max_batch_pixels: int,
        max_batch_delay_s: float,
        max_queue_tiles: int,
        request_timeout_s: float,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.task = task
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_tiles = max_queue_tiles
        self.request_timeout_s = request_timeout_s
        self._executor = executor
        self._jobs: deque[_Job] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._tiles_per_s = 0.0  # running estimate, for Retry-After
        self._last_done = 0.0
        self._in_flight = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        self._finishing: set[asyncio.Task[None]] = set()
        self._closing = False
        # Exported at 0 from the start: a counter that appears with its first rejection gives rate() and
        # increase() nothing to compare, so the shedding alert and panel would miss the first burst.
        for reason in REJECT_REASONS:
            metrics.rejected.labels(task, reason)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.task}")

    def close(self) -> None:
        """Refuse new work and fail every waiting job (503); a forward pass already running completes."""
        self._closing = True
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the server is shutting down; retry"))
        self._jobs.clear()
        self._queued = 0
        self._metrics.queued_tiles.labels(self.task).set(0)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for finishing in list(self._finishing):
            finishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await finishing
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._jobs.clear()

    @property
    def queued_tiles(self) -> int:
        return self._queued

    def _retry_after(self, tiles: int) -> int:
        rate = self._tiles_per_s or 10.0
        return max(1, min(60, math.ceil(tiles / rate)))

    async def infer(self, model: ServedModel, tiles: np.ndarray) -> list[torch.Tensor]:
        """Maps for uint8 tiles (N, t, t, 3), computed in shared batches: (n_i, 1, t, t) float32 tensors
        on the model's device whose tiles, in order, are the N tiles' maps. Each is a slice of the maps of
        the batch it ran in; they are not joined, since joining would copy every map once more (21 MB for
        a 2048x2048 image) and the stitcher reads them where they are."""
        count = int(tiles.shape[0])
        if count == 0:
            return []
        if self._closing:
            raise ShuttingDownError("the server is shutting down; retry")
        if self._queued + count > self.max_queue_tiles:
            self._metrics.rejected.labels(self.task, "queue_full").inc()
            raise OverloadedError(
                f"the {self.task} queue is full ({self._queued} tiles waiting, this image needs {count}, "
                f"limit {self.max_queue_tiles}); retry later",
                self._retry_after(self._queued + count),
            )
        job = _Job(model, tiles, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._queued += count
        self._metrics.queued_tiles.labels(self.task).set(self._queued)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=self.request_timeout_s)
        except TimeoutError:
            self._metrics.rejected.labels(self.task, "timeout").inc()
            raise InferenceTimeoutError(
                f"{self.task} inference did not finish within {self.request_timeout_s:g} s; retry later",
                self._retry_after(self._queued),
            ) from None
        finally:
            self._drop(job)

    def _drop(self, job: _Job) -> None:
        """Forget a finished, timed-out or cancelled job; its tiles not yet run leave the queue."""
        if job in self._jobs:
            self._jobs.remove(job)
            self._queued -= job.waiting
            job.next_tile = job.tiles.shape[0]
            self._metrics.queued_tiles.labels(self.task).set(self._queued)
        if not job.future.done():
            job.future.cancel()

    def batch_limit(self, tile_shape: tuple[int, ...]) -> int:
        """Most tiles of this (t, t, 3) shape one batch takes: `max_batch_size`, fewer where they would
        pass `max_batch_pixels`, and one at least (a tile larger than the budget still runs)."""
        pixels = int(tile_shape[0]) * int(tile_shape[1])
        return max(1, min(self.max_batch_size, self.max_batch_pixels // pixels))

    def _take_batch(self) -> list[tuple[_Job, int, int]]:
        """Up to the batch limit of tiles, oldest first, all of the head job's model and tile size."""
        head = self._jobs[0]
        key = head.key
        room = self.batch_limit(key[1])
        parts: list[tuple[_Job, int, int]] = []
        for job in list(self._jobs):
            if room == 0:
                break
            if job.key != key or job.waiting == 0:
                continue
            take = min(room, job.waiting)
            parts.append((job, job.next_tile, job.next_tile + take))
            job.next_tile += take
            room -= take
            if job.waiting == 0:
                self._jobs.remove(job)
        return parts

    def _ready_tiles(self, key: tuple[int, tuple[int, ...]]) -> int:
        return sum(job.waiting for job in self._jobs if job.key == key)

    async def _next_batch(self) -> list[tuple[_Job, int, int]]:
        """Wait for tiles, then for a full batch or the head job's deadline; take the batch (it may be
        empty when every waiting job was dropped meanwhile)."""
        while not self._jobs:
            self._wakeup.clear()
            await self._wakeup.wait()
        head = self._jobs[0]
        deadline = head.enqueued_at + self.max_batch_delay_s
        limit = self.batch_limit(head.key[1])
        while self._ready_tiles(head.key) < limit:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            if not self._jobs or self._jobs[0] is not head:
                break
        return self._take_batch() if self._jobs else []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A slot first: while the running batch and the prepared one hold both, tiles keep joining the
            # queue, so the batch taken next is as full as the wait allowed.
            await self._in_flight.acquire()
            parts = await self._next_batch()
            if not parts:
                self._in_flight.release()
                continue
            batch_size = sum(stop - start for _, start, stop in parts)
            self._queued -= batch_size
            self._metrics.queued_tiles.labels(self.task).set(self._queued)
            now = time.perf_counter()
            for job, _, _ in parts:
                if not job.started:
                    job.started = True
                    self._metrics.queue_seconds.labels(self.task).observe(now - job.enqueued_at)
            model = parts[0][0].model
            try:
                pending = await loop.run_in_executor(
                    self._executor, model.prepare, [job.tiles[start:stop] for job, start, stop in parts]
                )
            except Exception as error:
                self._in_flight.release()
                self._fail(parts, error, batch_size)
                continue
            finishing = loop.create_task(self._finish(parts, pending, batch_size, now))
            self._finishing.add(finishing)
            finishing.add_done_callback(self._finishing.discard)

    def _fail(self, parts: list[tuple[_Job, int, int]], error: Exception, batch_size: int) -> None:
        log.error("%s batch of %d tiles failed", self.task, batch_size, exc_info=error)
        for job, _, _ in parts:
            if not job.future.done():
                job.future.set_exception(error)

    async def _finish(
        self, parts: list[tuple[_Job, int, int]], pending: PendingBatch, batch_size: int, taken_at: float
    ) -> None:
        """Wait for a prepared batch's maps (in the executor: a second thread, so the next batch is prepared
        meanwhile) and hand each job its slice; a job whose tiles are all back gets its result."""
        loop = asyncio.get_running_loop()
        try:
            output, cpu_s = await loop.run_in_executor(self._executor, pending.result)
        except Exception as error:
            self._fail(parts, error, batch_size)
            return
        finally:
            self._in_flight.release()
        now = time.perf_counter()
        self._metrics.batch_size.labels(self.task).observe(batch_size)
        self._metrics.inference_seconds.labels(self.task).observe(now - taken_at)
        self._metrics.forward_cpu_seconds.labels(self.task).inc(cpu_s)
        # the rate batches complete at: measured from the later of this batch being taken and the previous
        # one completing, since a batch prepared ahead waits for the one before it
        busy = now - max(taken_at, self._last_done)
        self._last_done = now
        rate = batch_size / max(busy, 1e-6)
        self._tiles_per_s = rate if not self._tiles_per_s else 0.8 * self._tiles_per_s + 0.2 * rate
        offset = 0
        for job, start, stop in parts:
            size = stop - start
            if job.future.done():
                offset += size
                continue
            job.pieces.append((start, output[offset : offset + size]))
            offset += size
            job.done_tiles += size
            if job.done_tiles == job.tiles.shape[0]:
                # batches may finish out of order: their pieces go back in tile order
                job.future.set_result([maps for _, maps in sorted(job.pieces, key=lambda piece: piece[0])])
