"""GPU metrics under the DCGM exporter's names. No GPU or NVML library exists here, so the NVML module is
replaced by a stand-in with the same functions (the boundary that cannot run on this machine)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from fieldkube.serving.metrics import NvmlCollector, ServeMetrics


class StandInNvml:
    """The part of pynvml the collector calls, answering for two devices."""

    @staticmethod
    def nvmlDeviceGetCount() -> int:  # noqa: N802 (NVML's own name)
        return 2

    @staticmethod
    def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
        return index

    @staticmethod
    def nvmlDeviceGetUUID(handle: int) -> bytes:  # noqa: N802
        return f"GPU-{handle}".encode()

    @staticmethod
    def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=40 + handle, memory=0)

    @staticmethod
    def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=(handle + 1) * 512 * 1024 * 1024)


def test_utilisation_and_memory_use_dcgm_names_per_device() -> None:
    registry = CollectorRegistry()
    registry.register(NvmlCollector(StandInNvml()))
    text = generate_latest(registry).decode()
    assert 'DCGM_FI_DEV_GPU_UTIL{UUID="GPU-0",gpu="0"} 40.0' in text
    assert 'DCGM_FI_DEV_GPU_UTIL{UUID="GPU-1",gpu="1"} 41.0' in text
    assert 'DCGM_FI_DEV_FB_USED{UUID="GPU-1",gpu="1"} 1024.0' in text


def test_a_gpu_that_stops_answering_leaves_metrics_working() -> None:
    class Broken(StandInNvml):
        @staticmethod
        def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:  # noqa: N802
            raise RuntimeError("GPU is lost")

    registry = CollectorRegistry()
    registry.register(NvmlCollector(Broken()))
    assert "DCGM_FI_DEV_GPU_UTIL" in generate_latest(registry).decode()


def test_gpu_series_are_exported_exactly_when_nvml_answers() -> None:
    text = generate_latest(ServeMetrics().registry).decode()
    assert ("DCGM_FI_DEV_GPU_UTIL{" in text) == (NvmlCollector.create() is not None)
