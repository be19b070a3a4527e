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

from fieldkube.serving.batcher import TileBatcher
from fieldkube.serving.inference import TilePlan, predict_map
from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.registry import ModelRegistry
from fieldkube.serving.served_model import TASKS, ServedModel, Task
from fieldkube.serving.settings import ServeSettings

log = logging.getLogger(__name__)


class Service:
    """Everything a request needs; started and stopped by the app's lifespan."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServeMetrics()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.registry = ModelRegistry(settings, self.metrics)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fieldkube-infer")
        self.batchers: dict[Task, TileBatcher] = {
            task: TileBatcher(
                task,
                self.metrics,
                max_batch_size=settings.max_batch_size,
                max_batch_delay_s=settings.max_batch_delay_s,
                max_queue_tiles=settings.max_queue_tiles,
                request_timeout_s=settings.request_timeout_s,
                executor=self._executor,
            )
            for task in TASKS
        }
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start batchers and the model watcher, which loads the models in the background (ready after)."""
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

    async def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for batcher in self.batchers.values():
            await batcher.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.registry.close()

    async def predict(
        self, task: Task, image: np.ndarray, tile: int | None, overlap: int | None
    ) -> tuple[np.ndarray, TilePlan, ServedModel]:
        """Full-size map of `image` from `task`'s current model (held for the whole request)."""
        model = self.registry.get(task)
        size = tile or model.tile
        chosen_overlap = min(self.settings.default_overlap, size // 2) if overlap is None else overlap
        result, plan = await predict_map(
            self.batchers[task], model, image, size, chosen_overlap, self.settings.max_tiles_per_image
        )
        return result, plan, model


def get_service(request: Request) -> Service:
    """FastAPI dependency: the app's Service."""
    service: Service = request.app.state.service
    return service
