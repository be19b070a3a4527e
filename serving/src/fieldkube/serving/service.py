"""The running service's parts wired together: settings, metrics, model registry, one batcher per task.

Routes reach it through `get_service` (a FastAPI dependency), never through globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from fastapi import Request

from fieldkube.serving.admission import PixelBudget
from fieldkube.serving.batcher import BATCHES_IN_FLIGHT, TileBatcher
from fieldkube.serving.inference import PixelMap, TilePlan, TilingError, plan_tiles, predict_map
from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.registry import ModelRegistry
from fieldkube.serving.served_model import TASKS, ServedModel, Task
from fieldkube.serving.settings import ServeSettings, default_batch_pixels, default_batch_size

log = logging.getLogger(__name__)


class Service:
    """Everything a request needs; started and stopped by the app's lifespan."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServeMetrics()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.registry = ModelRegistry(settings, self.metrics)
        self.pixels = PixelBudget(settings.max_inflight_pixels, self.metrics)
        self.max_batch_size = settings.max_batch_size or default_batch_size(self.registry.device.type)
        self.max_batch_pixels = settings.max_batch_pixels or default_batch_pixels(self.max_batch_size)
        # Threads of their own per task: a segmenter batch never waits behind a counter batch (on a GPU
        # both run at once on their own streams). Within a task batches run one after another, and the
        # second thread prepares the next batch while one runs.
        self._executors = {
            task: ThreadPoolExecutor(
                max_workers=BATCHES_IN_FLIGHT, thread_name_prefix=f"fieldkube-infer-{task}"
            )
            for task in TASKS
        }
        self.batchers: dict[Task, TileBatcher] = {
            task: TileBatcher(
                task,
                self.metrics,
                max_batch_size=self.max_batch_size,
                max_batch_pixels=self.max_batch_pixels,
                max_batch_delay_s=settings.max_batch_delay_s,
                max_queue_tiles=settings.max_queue_tiles,
                request_timeout_s=settings.request_timeout_s,
                executor=self._executors[task],
            )
            for task in TASKS
        }
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start batchers and the model watcher, which loads the models in the background (ready after)."""
        self._loop = asyncio.get_running_loop()
        for batcher in self.batchers.values():
            batcher.start()
        self._stop.clear()
        self._watcher = asyncio.get_running_loop().create_task(
            self.registry.watch(self._stop), name="model-watcher"
        )

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every configured model is loaded (for callers that want to block)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.registry.ready() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.registry.ready()

    def begin_shutdown(self) -> None:
        """Refuse queued and new inference (503 + Retry-After) so requests in flight end at once.

        Safe to call from a signal handler or another thread: the work is scheduled on the event loop.
        """
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close_batchers)

    def _close_batchers(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    async def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for batcher in self.batchers.values():
            await batcher.stop()
        for executor in self._executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
        self.registry.close()

    async def predict(
        self, task: Task, image: np.ndarray, tile: int | None, overlap: int | None
    ) -> tuple[PixelMap, TilePlan, ServedModel]:
        """Full-size map of `image` from `task`'s current model (held for the whole request)."""
        model = self.registry.get(task)
        result, plan = await self._predict_with(model, image, tile, overlap)
        return result, plan, model

    async def predict_batch(
        self, model: ServedModel, images: np.ndarray, tile: int | None, overlap: int | None
    ) -> list[PixelMap]:
        """Maps of a batch of images, all from `model` (so one version answers for the whole batch).

        The images' tiles are queued together and share forward passes; if one image fails (queue
        full, timeout) the others are cancelled instead of running on for a request that already failed.
        """
        if len(images) > 1:
            height, width = images.shape[1:3]
            size = tile or model.tile
            plan = plan_tiles(height, width, size, self._overlap(size, overlap), self.max_tiles)
            needed = len(plan.boxes) * len(images)
            if needed > self.max_tiles:
                raise TilingError(
                    f"{len(images)} images of {width}x{height} need {needed} tiles of {size} pixels; one "
                    f"request may use at most {self.max_tiles}: send fewer images or use a larger tile"
                )
        try:
            async with asyncio.TaskGroup() as group:
                jobs = [group.create_task(self._predict_with(model, im, tile, overlap)) for im in images]
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None
        return [job.result()[0] for job in jobs]

    async def _predict_with(
        self, model: ServedModel, image: np.ndarray, tile: int | None, overlap: int | None
    ) -> tuple[PixelMap, TilePlan]:
        size = tile or model.tile
        return await predict_map(
            self.batchers[model.task], model, image, size, self._overlap(size, overlap), self.max_tiles
        )

    def _overlap(self, tile: int, requested: int | None) -> int:
        return min(self.settings.default_overlap, tile // 2) if requested is None else requested

    @property
    def max_tiles(self) -> int:
        """Most tiles one request may need: more could never fit the queue, so retrying would not help."""
        return min(self.settings.max_tiles_per_image, self.settings.max_queue_tiles)


def get_service(request: Request) -> Service:
    """FastAPI dependency: the app's Service."""
    service: Service = request.app.state.service
    return service
