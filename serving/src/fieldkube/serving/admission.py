"""Admission by pixels: a request's image is counted against a budget before it is decoded.

The tile queue (`TileBatcher`) limits tiles waiting for the model, but by the time an image reaches it, it
has been decoded, padded and cut, and it will be stitched: tens of bytes of memory per pixel on the way
(see `BYTES_PER_PIXEL`). Without a limit before that, a burst of large uploads takes memory faster than the
queue can refuse it. Every /v1 request reads its image's size from the file header, then asks the
budget for that many pixels; beyond the budget it gets 429 + Retry-After at once, before any pixel is
decoded. /v2 requests are admitted after parsing (their tensors arrive decoded) and before tiling.

All calls happen on the event loop thread, so the budget needs no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fieldkube.serving.batcher import OverloadedError
from fieldkube.serving.metrics import ServeMetrics

BYTES_PER_PIXEL = 64
"""The documented bound on the service's memory above idle, per pixel admitted: RSS stays below
``max_inflight_pixels * BYTES_PER_PIXEL`` above idle under any burst. Measured: one 26 MP image raised
the RSS by 40 bytes per pixel (counter at 1024 px tiles, batches of 4, CPU): the uint8 image, its padded
copy and tiles (~10), the float32 tile outputs (~4.5), the stitched map and its weights (8), one batch's
activations and what the allocator keeps (the rest)."""


class PixelBudget:
    """Pixels of the images being served at once, capped at `limit`.

    A single image may always be admitted when nothing else is (the settings keep `limit` at least the
    largest image allowed), so a large request is slowed, never starved for good.
    """

    def __init__(self, limit: int, metrics: ServeMetrics) -> None:
        self.limit = limit
        self.in_use = 0
        self._metrics = metrics
        self._pixels_per_s = 0.0  # running estimate of pixels answered per second, for Retry-After

    def retry_after(self, pixels: int) -> int:
        """Seconds until about `pixels` of the current work are likely answered (1 to 60)."""
        rate = self._pixels_per_s or 5_000_000.0
        return max(1, min(60, math.ceil((self.in_use + pixels - self.limit) / rate)))

    @contextmanager
    def admit(self, pixels: int, task: str, what: str) -> Iterator[None]:
        """Hold `pixels` of the budget for the block, or raise OverloadedError (429) at once."""
        if self.in_use and self.in_use + pixels > self.limit:
            self._metrics.rejected.labels(task, "pixel_budget").inc()
            raise OverloadedError(
                f"the server is busy with {self.in_use} pixels of images and {what} needs {pixels} more "
                f"(limit {self.limit}); retry later",
                self.retry_after(pixels),
            )
        self.in_use += pixels
        self._metrics.admitted_pixels.set(self.in_use)
        began = time.monotonic()
        try:
            yield
        finally:
            self.in_use -= pixels
            self._metrics.admitted_pixels.set(self.in_use)
            elapsed = time.monotonic() - began
            if elapsed > 0:
                rate = pixels / elapsed
                self._pixels_per_s = rate if not self._pixels_per_s else 0.8 * self._pixels_per_s + 0.2 * rate
