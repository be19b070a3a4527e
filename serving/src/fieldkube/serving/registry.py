"""Holds the model serving each task and keeps it current: resolves MLflow aliases and hot-reloads them.

Reload: resolve alias -> download the version's bundle -> load (safetensors) -> warm up -> swap the
reference atomically. Requests hold the instance they started with, so in-flight work finishes on the
old model. Two kinds of failure are kept apart:

- the model itself is bad (its bundle is unreadable or does not match its spec, or it fails the warm-up
  checks): that version is rejected (logged, counted) and not tried again until the alias moves to
  another version or the process restarts;
- anything else (registry or artifact store unreachable, a download cut short) is transient: the load is
  retried with exponential backoff (`load_retry_initial_s`, doubling up to `load_retry_max_s`), and a
  task with no model yet stays not ready meanwhile.

Either way the model serving now, if any, keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.model_source import ModelSource, parse_model_source
from fieldkube.serving.served_model import (
    ModelCheckError,
    ServedModel,
    Task,
    load_served_model,
    pick_device,
    pick_dtype,
)
from fieldkube.serving.settings import ServeSettings
from fieldkube.vision.bundle import BundleError, find_bundle_dir

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


RELOAD_OUTCOMES = ("loaded", "rejected", "resolve_failed", "load_failed")
"""The ``outcome`` label values of ``fieldkube_serve_model_reloads_total``."""


class ModelRegistry:
    """The current model of each configured task."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._device = pick_device(settings.device)
        self._dtype = pick_dtype(settings.precision, self._device)
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
        self._failures: dict[Task, int] = {}  # consecutive transient failures
        self._retry_at: dict[Task, float] = {}  # time.monotonic() before which no retry is made
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

        Does nothing while a transient failure's backoff runs. Blocking (download + load + warm-up):
        call from a worker thread.
        """
        source = self.sources[task]
        current = self._models.get(task)
        if current is not None and not source.watchable:
            return False
        if time.monotonic() < self._retry_at.get(task, 0.0):
            return False
        try:
            resolved = self._resolve(source)
        except Exception as error:
            self._transient(task, f"cannot resolve {source.uri}: {error}", outcome="resolve_failed")
            return False
        if current is not None and resolved.version == current.version:
            self._recovered(task)
            return False
        if resolved.version is not None and self._rejected.get(task) == resolved.version:
            self._recovered(task)
            return False
        try:
            model = self._load(task, source, resolved)
        except (ModelCheckError, BundleError) as error:
            if resolved.version is not None:
                self._rejected[task] = resolved.version
            self._recovered(task)
            self._fail(task, resolved.version, str(error), outcome="rejected")
            return False
        except Exception as error:
            version = f"version {resolved.version}" if resolved.version else source.uri
            self._transient(
                task, f"loading {version} failed: {type(error).__name__}: {error}", outcome="load_failed"
            )
            return False
        self._recovered(task)
        with self._swap_lock:
            old = self._models.get(task)
            self._models[task] = model
        self.last_error.pop(task, None)
        self._metrics.set_model(task, model.name, model.version, model.architecture, model.loaded_at)
        self._metrics.model_reloads.labels(task, "loaded").inc()
        if old is None:
            log.info(
                "serving %s model %s version %s from %s (%s on %s)",
                task,
                model.name,
                model.version,
                source.uri,
                str(model.dtype).removeprefix("torch."),
                model.device,
            )
        else:
            log.info(
                "hot-reloaded %s model %s: version %s -> %s", task, model.name, old.version, model.version
            )
        return True

    def retry_delay_s(self, failures: int) -> float:
        """Backoff after `failures` consecutive transient failures: initial, doubling, capped."""
        initial, cap = self._settings.load_retry_initial_s, self._settings.load_retry_max_s
        return float(min(cap, initial * 2.0 ** min(failures - 1, 62)))

    def _transient(self, task: Task, message: str, outcome: str) -> None:
        failures = self._failures.get(task, 0) + 1
        self._failures[task] = failures
        delay = self.retry_delay_s(failures)
        self._retry_at[task] = time.monotonic() + delay
        self._fail(task, None, f"{message} (attempt {failures}; retrying in {delay:g} s)", outcome)

    def _recovered(self, task: Task) -> None:
        self._failures.pop(task, None)
        self._retry_at.pop(task, None)

    def next_retry_in_s(self) -> float | None:
        """Seconds until the earliest pending retry of a transient failure (None: none pending)."""
        if not self._retry_at:
            return None
        return max(0.0, min(self._retry_at.values()) - time.monotonic())

    def _fail(self, task: Task, version: str | None, message: str, outcome: str) -> None:
        self.last_error[task] = message
        self._metrics.model_reloads.labels(task, outcome).inc()
        keeping = self._models.get(task)
        if keeping is not None:
            what = "rejected" if outcome == "rejected" else "could not load"
            log.error(
                "%s %s model version %s (%s); still serving version %s",
                what,
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
            return load_served_model(
                Path(source.uri), task, None, None, self._device, source.uri, self._dtype
            )
        import mlflow.artifacts

        target = Path(tempfile.mkdtemp(prefix=f"{task}-", dir=self._cache))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=resolved.artifact_uri,
                dst_path=str(target),
                tracking_uri=self._settings.mlflow_tracking_uri,
            )
            bundle = find_bundle_dir(Path(local))
            return load_served_model(
                bundle, task, resolved.name, resolved.version, self._device, source.uri, self._dtype
            )
        finally:
            shutil.rmtree(target, ignore_errors=True)  # weights are in memory now

    def close(self) -> None:
        shutil.rmtree(self._cache, ignore_errors=True)

    # -- watching ------------------------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s` (and when a retry is due): load missing models and follow moved
        aliases, until `stop` is set."""
        interval = self._settings.poll_interval_s
        while not stop.is_set():
            for task in self.tasks():
                source = self.sources[task]
                if task not in self._models or source.watchable:
                    await asyncio.to_thread(self.refresh, task)
            if interval <= 0 and self.ready():
                return
            wait = interval if interval > 0 else 5.0
            retry_in = self.next_retry_in_s()
            if retry_in is not None:
                wait = min(wait, retry_in)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
