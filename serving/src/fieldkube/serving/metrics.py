"""Prometheus metrics of the inference service, kept in one registry per app so apps never share state.

Names follow Prometheus conventions (base units, ``_total`` counters). GPU utilisation and memory use
the DCGM exporter's names and are read through NVML (nvidia-ml-py) only when a GPU and the library exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class ServeMetrics:
    """All metrics the service exports."""

    def __init__(self, gpu: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "fieldkube_serve_request_duration_seconds",
            "HTTP request latency by endpoint (route template) and status code",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "fieldkube_serve_requests_in_flight", "HTTP requests being handled now", registry=r
        )
        self.queue_seconds = Histogram(
            "fieldkube_serve_queue_wait_seconds",
            "time an image's first tile waited in the batch queue",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "fieldkube_serve_batch_inference_seconds",
            "time from a batch taken off the queue to its maps being ready (a forward pass, and the wait for "
            "the batch before it when this one was prepared while that one ran)",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_cpu_seconds = Counter(
            "fieldkube_serve_forward_cpu_seconds",
            "CPU time of the model in forward passes, on the threads that run them (all of it with "
            "--torch-threads 1; torch's intra-op threads are not counted; tile normalisation is not the "
            "model's): the rest of the process's CPU is the service's own work",
            ["task"],
            registry=r,
        )
        self.batch_size = Histogram(
            "fieldkube_serve_batch_size",
            "tiles per forward pass",
            ["task"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queued_tiles = Gauge(
            "fieldkube_serve_queued_tiles", "tiles waiting for a forward pass", ["task"], registry=r
        )
        self.rejected = Counter(
            "fieldkube_serve_rejected_requests_total",
            "requests refused for load: queue_full or pixel_budget (429), timeout (503)",
            ["task", "reason"],
            registry=r,
        )
        self.admitted_pixels = Gauge(
            "fieldkube_serve_admitted_pixels",
            "pixels of the images being served now (decoded to answered); at most max_inflight_pixels",
            registry=r,
        )
        self.predicted_count = Histogram(
            "fieldkube_serve_predicted_count",
            "flowers counted per image (drift signal)",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.mask_fraction = Histogram(
            "fieldkube_serve_mask_fraction",
            "building fraction per segmented image (drift signal)",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "fieldkube_serve_model_info",
            "the model serving each task (value 1)",
            ["task", "name", "version", "architecture"],
            registry=r,
        )
        self.model_loaded_timestamp = Gauge(
            "fieldkube_serve_model_loaded_timestamp_seconds",
            "when the current model of a task was swapped in",
            ["task"],
            registry=r,
        )
        self.model_reloads = Counter(
            "fieldkube_serve_model_reloads_total",
            "model loads by outcome: loaded, rejected (bad version, old one kept), resolve_failed "
            "(registry unreachable) and load_failed (artifacts unreachable), both retried with backoff",
            ["task", "outcome"],
            registry=r,
        )
        if gpu:
            collector = NvmlCollector.create()
            if collector is not None:
                r.register(collector)

    def set_model(self, task: str, name: str, version: str, architecture: str, loaded_at: float) -> None:
        """Record the model now serving `task`, replacing the previous one's info series."""
        for labels in list(self._info_labels(task)):
            self.model_info.remove(*labels)
        self.model_info.labels(task, name, version, architecture).set(1)
        self.model_loaded_timestamp.labels(task).set(loaded_at)

    def _info_labels(self, task: str) -> Iterator[tuple[str, ...]]:
        for metric in self.model_info.collect():
            for sample in metric.samples:
                if sample.labels.get("task") == task:
                    yield tuple(sample.labels[k] for k in ("task", "name", "version", "architecture"))


class NvmlCollector(Collector):
    """GPU utilisation (%) and framebuffer use (MiB) per device, named as the DCGM exporter names them."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    @classmethod
    def create(cls) -> NvmlCollector | None:
        """A collector when nvidia-ml-py is installed and a GPU answers; None otherwise."""
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                return None
        except Exception as error:  # no library, no driver or no device: GPU metrics are simply absent
            log.debug("GPU metrics off: %s", error)
            return None
        return cls(pynvml)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        util = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=["gpu", "UUID"])
        used = GaugeMetricFamily(
            "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=["gpu", "UUID"]
        )
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(index), uuid], float(rates.gpu))
                used.add_metric([str(index), uuid], float(memory.used) / (1024 * 1024))
        except Exception as error:  # a GPU that stops answering must not break /metrics
            log.warning("reading GPU metrics failed: %s", error)
        yield util
        yield used
