"""Prometheus `/metrics` of every training rank: throughput, step time, loader wait, loss, GPU (DCGM names).

Each rank serves its own registry on `port + local_rank`, so several ranks on one host do not collide.
GPU gauges follow the DCGM exporter's names and labels (DCGM_FI_DEV_GPU_UTIL %, DCGM_FI_DEV_FB_USED MiB,
DCGM_FI_DEV_POWER_USAGE W; labels gpu, UUID, pod, namespace) and are read through nvidia-ml-py (pynvml)
at scrape time, only when a GPU and the library are present.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fieldkube.contract.names import JOB_NAMESPACE_ENV

log = logging.getLogger("fieldkube.metrics")

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GpuCollector(Collector):
    """DCGM-style per-GPU gauges read via NVML when scraped."""

    def __init__(self, device_index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.labels = {
            "gpu": str(device_index),
            "UUID": str(pynvml.nvmlDeviceGetUUID(self.handle)),
            "pod": os.environ.get("POD_NAME", socket.gethostname()),
            "namespace": os.environ.get(JOB_NAMESPACE_ENV, os.environ.get("POD_NAMESPACE", "")),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names = list(self.labels)
        values = list(self.labels.values())
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        power_mw = self.nvml.nvmlDeviceGetPowerUsage(self.handle)
        for name, doc, value in (
            ("DCGM_FI_DEV_GPU_UTIL", "GPU utilisation (%).", float(util)),
            ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (MiB).", memory.used / 2**20),
            ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (MiB).", memory.free / 2**20),
            ("DCGM_FI_DEV_POWER_USAGE", "Power draw (W).", power_mw / 1000.0),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family


class TrainingMetrics:
    """The training gauges/counters/histograms of one rank, in their own registry."""

    def __init__(self, rank: int, job: str, gpu_index: int | None = None) -> None:
        self.registry = CollectorRegistry()
        # Not "job": Prometheus sets that label to the scrape job and would rename ours to exported_job.
        labels = ["rank", "trainingjob"]
        self._values = {"rank": str(rank), "trainingjob": job}
        r = self.registry
        self.images_per_second = Gauge(
            "fieldkube_train_images_per_second",
            "Images/s of this rank over the last log window, every wait included (loader, epoch "
            "boundaries, validation, checkpoints).",
            labels,
            registry=r,
        )
        self.mfu = Gauge(
            "fieldkube_train_mfu",
            "Model FLOPs utilisation over the last log window: achieved / dense bf16 peak (0-1).",
            labels,
            registry=r,
        )
        self.step_duration = Histogram(
            "fieldkube_train_step_duration_seconds",
            "Optimizer step wall time.",
            labels,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.loader_wait = Histogram(
            "fieldkube_train_loader_wait_seconds",
            "Time the step waited for its batch.",
            labels,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.allreduce = Histogram(
            "fieldkube_train_allreduce_seconds",
            "Gradient allreduce time (Horovod).",
            labels,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.loss = Gauge("fieldkube_train_loss", "Last training loss.", labels, registry=r)
        self.epoch = Gauge("fieldkube_train_epoch", "Current epoch (0-based).", labels, registry=r)
        self.samples = Counter("fieldkube_train_samples", "Training samples processed.", labels, registry=r)
        self.steps = Counter("fieldkube_train_steps", "Optimizer steps done.", labels, registry=r)
        self.gpu: GpuCollector | None = None
        if gpu_index is not None:
            try:
                self.gpu = GpuCollector(gpu_index)
                r.register(self.gpu)
            except Exception as exc:  # no NVML on this host: GPU gauges are simply absent
                log.warning("GPU metrics unavailable (%s)", exc)

    def _l(self, metric: Any) -> Any:
        return metric.labels(**self._values)

    def observe_step(
        self, images: int, step_s: float, wait_s: float, loss: float, epoch: int, allreduce_s: float | None
    ) -> None:
        self._l(self.step_duration).observe(step_s)
        self._l(self.loader_wait).observe(wait_s)
        if allreduce_s is not None:
            self._l(self.allreduce).observe(allreduce_s)
        self._l(self.loss).set(loss)
        self._l(self.epoch).set(epoch)
        self._l(self.samples).inc(images)
        self._l(self.steps).inc()

    def observe_window(self, images_per_second: float, mfu: float | None) -> None:
        """The rates of a log window (ThroughputMeter.window), not of one step: one step's rate leaves
        out the stalls between steps and overstated throughput many times over on a starved GPU."""
        self._l(self.images_per_second).set(images_per_second)
        if mfu is not None:
            self._l(self.mfu).set(mfu)

    def serve(self, port: int, address: str) -> int:
        """Start the HTTP exporter; returns the bound port (0 picks a free one)."""
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        bound: int = server.server_address[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", address, bound)
        return bound
