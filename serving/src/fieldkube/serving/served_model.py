"""A loaded, warmed-up model as the service uses it: weights on a device, the name and version it reports.

Instances are immutable; a hot reload builds a new one and swaps the reference, so a request that picked
up the old instance finishes on it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fieldkube.serving.settings import Precision
from fieldkube.vision.bundle import WEIGHTS_FILE, load_bundle
from fieldkube.vision.golden import GoldenSample, compare_answers, summarise_map
from fieldkube.vision.normalize import normalize_batch

log = logging.getLogger(__name__)

Task = Literal["counter", "segmenter"]
TASKS: tuple[Task, ...] = ("counter", "segmenter")


class ModelCheckError(RuntimeError):
    """A model that loaded but fails its warm-up checks (wrong task, bad output shape, NaN, a golden sample
    whose answer is not the one recorded at training)."""


def pick_device(requested: str) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelCheckError("device 'cuda' requested but no CUDA device is available")
    return torch.device(requested)


def pick_dtype(requested: Precision, device: torch.device) -> torch.dtype:
    """The forward pass's compute type. `auto` means bf16 autocast on a GPU that has it (1.1-1.5x the
    tiles/s of fp32 on an H200, no loss scaling needed at inference) and fp32 elsewhere: on CPUs without
    bf16 units autocast is slower, and the CPU path keeps its figures."""
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One model ready to serve. `forward` maps uint8 RGB tiles (N, t, t, 3) to maps (N, 1, t, t),
    normalising them where the model runs (on a GPU, after a copy of a quarter of float32's bytes).

    Counter maps are counts per pixel (already divided by the bundle's density_scale); segmenter maps
    are probabilities (sigmoid applied). `golden` is the bundle's golden sample, checked by `warm_up`.
    `dtype` is the compute type (bf16: under autocast; maps come back float32 either way); on a GPU the
    module and its input are channels_last, the layout cuDNN's fastest convolutions read.
    """

    task: Task
    name: str
    version: str
    architecture: str
    tile: int
    density_scale: float
    module: nn.Module
    device: torch.device
    source: str
    dtype: torch.dtype = torch.float32
    golden: GoldenSample | None = field(default=None, repr=False)
    loaded_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stream: torch.cuda.Stream | None = field(default=None, repr=False)

    def forward(self, tiles: np.ndarray) -> np.ndarray:
        """Run one batch; safe to call from worker threads (one forward at a time per model)."""
        return self.forward_timed(tiles)[0]

    def forward_timed(self, tiles: np.ndarray) -> tuple[np.ndarray, float]:
        """`forward`, and the CPU seconds this thread spent in the model itself (the module and its
        activation; not normalising the tiles or copying them), so the service can tell its own CPU work
        from the model's."""
        return self._run(torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.uint8)))

    def _run(self, x: torch.Tensor) -> tuple[np.ndarray, float]:
        """Maps of a batch and the model's CPU seconds on this thread: uint8 (N, t, t, 3) tiles are
        normalised on the device; float32 (N, 3, t, t) input is taken as already normalised (the warm-up's
        zero tile)."""
        with self._lock, torch.inference_mode():
            if self.device.type == "cuda":
                stream = self._stream or torch.cuda.current_stream(self.device)
                with torch.cuda.stream(stream):
                    x = x.pin_memory().to(self.device, non_blocking=True)
                    x = self._normalised(x).contiguous(memory_format=torch.channels_last)
                    began = time.thread_time()
                    y = self._maps(x).to("cpu", non_blocking=True)
                    stream.synchronize()
                    model_cpu_s = time.thread_time() - began
            else:
                x = self._normalised(x)
                began = time.thread_time()
                y = self._maps(x)
                model_cpu_s = time.thread_time() - began
        out: np.ndarray = y.numpy()
        return out, model_cpu_s

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """float32 maps of normalised input, computed in `dtype`."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            y = self.module(x)
        return self._activate(y.float())

    @staticmethod
    def _normalised(x: torch.Tensor) -> torch.Tensor:
        return normalize_batch(x) if x.dtype == torch.uint8 else x

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.task == "segmenter":
            return torch.sigmoid(y)
        return y / self.density_scale

    def warm_up(self) -> None:
        """Run a tile through the model and check what comes out, so a broken model is never swapped in.

        With a golden sample, its tile goes through `forward` as the tiles of an image do, and the answer
        must match the one recorded at training within the tolerances of `fieldkube.vision.golden`: that
        catches a wrong density_scale or wrong weights. Without one, a zero tile (after normalisation) only
        checks the output's shape and that it is finite.
        """
        if self.golden is None:
            log.info(
                "%s v%s: the bundle has no golden sample; warm-up checks only output shape and finiteness",
                self.name,
                self.version,
            )
            x = torch.zeros((1, 3, self.tile, self.tile))  # normalised: the mean colour of training images
        else:
            x = torch.from_numpy(self.golden.image[None].copy())
        try:
            out, _ = self._run(x)
        except torch.cuda.OutOfMemoryError:
            raise  # the device, not the model: worth retrying
        except Exception as error:
            raise ModelCheckError(
                f"{self.name} v{self.version}: warm-up forward pass failed ({type(error).__name__}: {error})"
            ) from None
        if out.shape != (1, 1, self.tile, self.tile):
            raise ModelCheckError(
                f"{self.name} v{self.version}: output shape {out.shape}, "
                f"expected (1, 1, {self.tile}, {self.tile})"
            )
        if not np.all(np.isfinite(out)):
            raise ModelCheckError(f"{self.name} v{self.version}: output contains NaN or infinity")
        if self.golden is not None:
            observed = summarise_map(self.task, out)
            problem = compare_answers(self.task, observed, self.golden.answer)
            if problem is not None:
                suspect = "wrong density_scale or weights?" if self.task == "counter" else "wrong weights?"
                raise ModelCheckError(f"{self.name} v{self.version}: golden sample {problem}: {suspect}")
            log.info(
                "%s v%s: golden sample matches the answer recorded at training (%s)",
                self.name,
                self.version,
                ", ".join(f"{key} {value:.3f}" for key, value in observed.items()),
            )


def weights_digest(bundle_dir: Path) -> str:
    """Short content hash of a bundle's weights: the version of a model served from a local path."""
    digest = hashlib.sha256()
    with (bundle_dir / WEIGHTS_FILE).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def load_served_model(
    bundle_dir: Path,
    task: Task,
    name: str | None,
    version: str | None,
    device: torch.device,
    source: str,
    dtype: torch.dtype = torch.float32,
) -> ServedModel:
    """Load a bundle directory safely (safetensors), check its task, warm it up (on its golden sample when
    it has one) in the precision it will serve in."""
    loaded = load_bundle(bundle_dir, device=device)
    if device.type == "cuda":
        loaded.model.to(memory_format=torch.channels_last)
    spec = loaded.spec
    if spec.task != task:
        raise ModelCheckError(
            f"{source}: bundle {spec.name!r} is a {spec.task} model, expected a {task} model"
        )
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    served = ServedModel(
        task=task,
        name=name or spec.name,
        version=version or f"local-{weights_digest(bundle_dir)}",
        architecture=spec.name,
        tile=spec.tile,
        density_scale=spec.density_scale,
        module=loaded.model,
        device=device,
        source=source,
        dtype=dtype,
        golden=loaded.golden,
        _stream=stream,
    )
    served.warm_up()
    return served
