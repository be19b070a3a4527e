"""Honest training throughput: window rates that include every wait, achieved TFLOP/s and MFU.

A rate counts the wall-clock time between two log points, whatever filled it (the step, waiting for
the loader, an epoch boundary, validation, a checkpoint), so a dashboard never shows more images per
second than the run achieves. FLOPs are counted once per model and tile (forward and backward of one
image, on the meta device: nothing is computed); MFU divides the achieved FLOP/s by the devices'
dense bf16 peak, known from the GPU's name or given as runtime.peak_tflops.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("fieldkube.train")

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets). Matched against
# torch.cuda.get_device_name in this order, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The peak to compute MFU against: ``override``, else the GPU's from the table, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def train_flops_per_image(model: nn.Module, tile: int) -> float | None:
    """FLOPs of one training step per image (forward + backward) at ``tile`` px; None if uncountable.

    User models that cannot run on the meta device are skipped (MFU is then not reported).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if tile <= 0:
        return None
    try:
        shadow = copy.deepcopy(model).to("meta")
        with FlopCounterMode(display=False) as counter:
            shadow(torch.empty(1, 3, tile, tile, device="meta")).float().sum().backward()
    except Exception as exc:  # a user model's forward may do anything; the figure is optional
        log.info("FLOPs not counted (%s: %s): no MFU figure", type(exc).__name__, exc)
        return None
    return float(counter.get_total_flops())


@dataclass
class Window:
    images_per_second: float
    loader_wait_share: float
    tflops: float | None
    mfu: float | None


@dataclass
class ThroughputMeter:
    """Steps of this run: window rates for logs and gauges, and the run's summary figures.

    ``world`` ranks each process ``images`` per step; rates are for the whole job.
    """

    world: int
    flops_per_image: float | None = None
    peak_tflops_per_device: float | None = None
    clock: Callable[[], float] = time.perf_counter
    started: float = field(init=False)
    _window_start: float = field(init=False)
    _window_images: int = 0
    _window_wait: float = 0.0
    _images: int = 0
    _steady_images: int = 0
    _steady_seconds: float = 0.0
    _steady_wait: float = 0.0
    _step_times: list[float] = field(default_factory=list)
    _epoch_first_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = self._now()
        self._window_start = self.started

    def _now(self) -> float:
        return self.clock()

    def epoch_starts(self) -> None:
        """The next step is the first of an epoch (its wait is the epoch-boundary stall)."""
        self._epoch_first_steps.append(len(self._step_times))

    def step(self, images: int, wait_s: float, step_s: float) -> None:
        total = images * self.world
        self._window_images += total
        self._window_wait += wait_s
        self._images += total
        if self._step_times:  # the first step pays for lazy initialisation: not steady state
            self._steady_images += total
            self._steady_seconds += wait_s + step_s
            self._steady_wait += wait_s
        self._step_times.append(wait_s + step_s)

    def _rates(self, images: float, seconds: float) -> tuple[float, float | None, float | None]:
        rate = images / seconds if seconds > 0 else 0.0
        if self.flops_per_image is None:
            return rate, None, None
        tflops = rate * self.flops_per_image / 1e12
        peak = self.peak_tflops_per_device
        return rate, tflops, (tflops / (peak * self.world) if peak else None)

    def window(self) -> Window:
        """Rates since the previous window (or the start), then a new window begins."""
        now = self._now()
        seconds = now - self._window_start
        rate, tflops, mfu = self._rates(self._window_images, seconds)
        share = self._window_wait / seconds if seconds > 0 else 0.0
        self._window_start, self._window_images, self._window_wait = now, 0, 0.0
        return Window(rate, share, tflops, mfu)

    def epoch_start_stall(self) -> float | None:
        """The longest epoch-start step (the run's first aside) in median step times."""
        starts = [i for i in self._epoch_first_steps if 0 < i < len(self._step_times)]
        if not starts or len(self._step_times) < 3:
            return None
        median = statistics.median(self._step_times[1:])
        return max(self._step_times[i] for i in starts) / median if median > 0 else None

    def summary(self) -> dict[str, float | None]:
        """Figures of the whole run: steady state (first step excluded) and wall clock (all included)."""
        elapsed = self._now() - self.started
        steady, tflops, mfu = self._rates(self._steady_images, self._steady_seconds)
        whole, _, whole_mfu = self._rates(self._images, elapsed)
        return {
            "train_images_per_second": steady if self._steady_seconds else None,
            "run_images_per_second": whole if elapsed > 0 else None,
            "loader_wait_share": self._steady_wait / self._steady_seconds if self._steady_seconds else None,
            "epoch_start_stall_steps": self.epoch_start_stall(),
            "achieved_tflops": tflops,
            "mfu": mfu,
            "run_mfu": whole_mfu,
        }
