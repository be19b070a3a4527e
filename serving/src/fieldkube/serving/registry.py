"""Holds the model serving each task and keeps it current: resolves MLflow aliases and hot-reloads them.

Reload: resolve alias -> download the version's bundle -> load (safetensors) -> warm up -> swap the
reference atomically. Requests hold the instance they started with, so in-flight work finishes on the
old model. A version that fails any step is rejected (logged, counted in metrics, not retried until the
alias moves again) and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.model_source import ModelSource, parse_model_source
from fieldkube.serving.served_model import ServedModel, Task, load_served_model, pick_device
from fieldkube.serving.settings import ServeSettings
from fieldkube.vision.bundle import find_bundle_dir

log = logging.getLogger(__name__)


class ModelNotAvailableError(LookupError):
    """A task with no model: not configured (retrying cannot help), or not loaded yet (it can)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ResolvedVersion:
    """What an MLflow URI points at now."""

    name: str | None
    version: str | None
    artifact_uri: str | None


RELOAD_OUTCOMES = ("loaded", "rejected", "resolve_failed")
"""The ``outcome`` label values of ``fieldkube_serve_model_reloads_total``."""


class ModelRegistry:
    """The current model of each configured task."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._device = pick_device(settings.device)
        self.sources: dict[Task, ModelSource] = {}
        if settings.counter:
            self.sources["counter"] = parse_model_source(settings.counter)
        if settings.segmenter:
            self.sources["segmenter"] = parse_model_source(settings.segmenter)
        # Every outcome's series exists from the start, at 0: Prometheus' increase() over a counter that
        # appears with its first increment reads 0, so a first reload or rejection would never show.
        for task in self.sources:
            for outcome in RELOAD_OUTCOMES:
                metrics.model_reloads.labels(task, outcome)
        self._models: dict[Task, ServedModel] = {}
        self._rejected: dict[Task, str] = {}
        self.last_error: dict[Task, str] = {}
        self._swap_lock = threading.Lock()
        self._cache = Path(tempfile.mkdtemp(prefix="fieldkube-serve-models-"))

    @property
    def device(self) -> torch.device:
        """Where the models run."""
        return self._device

    # -- reading -------------------------------------------------------------------------------------
    def get(self, task: Task) -> ServedModel:
        """The model serving `task` now; raises ModelNotAvailableError."""
        model = self._models.get(task)
        if model is None:
            if task not in self.sources:
                raise ModelNotAvailableError(f"no {task} model is configured on this server", retryable=False)
            reason = self.last_error.get(task, "still loading")
            raise ModelNotAvailableError(f"the {task} model is not ready: {reason}", retryable=True)
        return model

    def ready(self) -> bool:
        """True once every configured task has a warmed-up model (stays true across reloads)."""
        return all(task in self._models for task in self.sources)

    def tasks(self) -> list[Task]:
        return list(self.sources)

    # -- loading -------------------------------------------------------------------------------------
    def refresh(self, task: Task) -> bool:
        """Load `task`'s model if it is missing or its alias moved; True when a new model was swapped in.

        Blocking (download + load + warm-up): call from a worker thread.
        """
        source = self.sources[task]
        current = self._models.get(task)
        if current is not None and not source.watchable:
            return False
        try:
            resolved = self._resolve(source)
        except Exception as error:
            self._fail(task, None, f"cannot resolve {source.uri}: {error}", outcome="resolve_failed")
            return False
        if current is not None and resolved.version == current.version:
            return False
        if resolved.version is not None and self._rejected.get(task) == resolved.version:
            return False
        try:
            model = self._load(task, source, resolved)
        except Exception as error:
            if resolved.version is not None:
                self._rejected[task] = resolved.version
            self._fail(task, resolved.version, str(error), outcome="rejected")
            return False
        with self._swap_lock:
            old = self._models.get(task)
            self._models[task] = model
        self.last_error.pop(task, None)
        self._metrics.set_model(task, model.name, model.version, model.architecture, model.loaded_at)
        self._metrics.model_reloads.labels(task, "loaded").inc()
        if old is None:
            log.info("serving %s model %s version %s from %s", task, model.name, model.version, source.uri)
        else:
            log.info(
                "hot-reloaded %s model %s: version %s -> %s", task, model.name, old.version, model.version
            )
        return True

    def _fail(self, task: Task, version: str | None, message: str, outcome: str) -> None:
        self.last_error[task] = message
        self._metrics.model_reloads.labels(task, outcome).inc()
        keeping = self._models.get(task)
        if keeping is not None:
            log.error(
                "rejected %s model version %s (%s); still serving version %s",
                task,
                version,
                message,
                keeping.version,
            )
        else:
            log.error("loading the %s model failed: %s", task, message)

    def _resolve(self, source: ModelSource) -> ResolvedVersion:
        if source.kind == "path":
            return ResolvedVersion(None, None, source.uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self._settings.mlflow_tracking_uri)
        if source.kind == "alias":
            assert source.registered_name is not None and source.alias is not None
            mv = client.get_model_version_by_alias(source.registered_name, source.alias)
            return ResolvedVersion(source.registered_name, str(mv.version), mv.source)
        if source.kind == "version":
            assert source.registered_name is not None and source.version is not None
            mv = client.get_model_version(source.registered_name, source.version)
            return ResolvedVersion(source.registered_name, str(mv.version), mv.source)
        return ResolvedVersion(None, None, source.uri)

    def _load(self, task: Task, source: ModelSource, resolved: ResolvedVersion) -> ServedModel:
        if source.kind == "path":
            return load_served_model(Path(source.uri), task, None, None, self._device, source.uri)
        import mlflow.artifacts

        target = Path(tempfile.mkdtemp(prefix=f"{task}-", dir=self._cache))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=resolved.artifact_uri,
                dst_path=str(target),
                tracking_uri=self._settings.mlflow_tracking_uri,
            )
            bundle = find_bundle_dir(Path(local))
            return load_served_model(bundle, task, resolved.name, resolved.version, self._device, source.uri)
        finally:
            shutil.rmtree(target, ignore_errors=True)  # weights are in memory now

    def close(self) -> None:
        shutil.rmtree(self._cache, ignore_errors=True)

    # -- watching ------------------------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s`: load missing models and follow moved aliases, until `stop` is set."""
        interval = self._settings.poll_interval_s
        while not stop.is_set():
            for task in self.tasks():
                source = self.sources[task]
                if task not in self._models or source.watchable:
                    await asyncio.to_thread(self.refresh, task)
            if interval <= 0 and self.ready():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval if interval > 0 else 5.0)
