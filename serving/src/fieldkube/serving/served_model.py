"""A loaded, warmed-up model as the service uses it: weights on a device, the name and version it reports.

Instances are immutable; a hot reload builds a new one and swaps the reference, so a request that picked
up the old instance finishes on it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
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


class PendingBatch:
    """A batch staged by `ServedModel.prepare`: `result()` gives its maps (N, 1, t, t), a float32 tensor
    where the model runs, and the CPU seconds the model took on the calling threads (launching kernels
    or running them; not preparing the batch), so the service can tell its own CPU work from the
    model's. Call it once."""

    def __init__(self, finish: Callable[[], tuple[torch.Tensor, float]]) -> None:
        self._finish = finish

    def result(self) -> tuple[torch.Tensor, float]:
        return self._finish()


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One model ready to serve. `forward` maps uint8 RGB tiles (N, t, t, 3) to maps (N, 1, t, t),
    normalising them where the model runs (on a GPU, after a copy of a quarter of float32's bytes).

    Counter maps are counts per pixel (already divided by the bundle's density_scale); segmenter maps
    are probabilities (sigmoid applied). `golden` is the bundle's golden sample, checked by `warm_up`.
    `dtype` is the compute type (bf16: under autocast; maps come back float32 either way). The module
    and its input are channels_last on every device: the layout cuDNN's fastest convolutions read, and
    on a CPU oneDNN's (measured here: these models' forward 1.2-2.0x faster than in the contiguous
    layout, bench/README.md); normalisation produces it without a transpose.
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
        """Run one batch and bring its maps to the host; safe to call from worker threads (one forward at
        a time per model)."""
        return self.prepare([tiles]).result()[0].cpu().numpy()

    def prepare(self, parts: Sequence[np.ndarray | torch.Tensor]) -> PendingBatch:
        """Stage one batch, the concatenation of `parts`, where the model runs; `result()` runs it.

        Splitting a batch's life in two lets the batcher prepare the next batch while this one runs. On
        the CPU, preparing is concatenating and normalising the uint8 tiles, and `result()` is the forward
        pass. On a GPU, preparing copies each part to the device (asynchronously from pinned memory: the
        parts stay referenced until the result is read), normalises there and queues the forward pass on
        the model's stream; `result()` only waits for it, so the device runs batches back to back while
        the host prepares the next. The maps stay on the device: the service stitches them there and
        copies back only what it answers with. uint8 (N, t, t, 3) parts are
        normalised; float32 (N, 3, t, t) ones are taken as already normalised (the warm-up's zero tile).
        """
        tensors = [
            p if isinstance(p, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(p)) for p in parts
        ]
        if self.device.type == "cuda":
            return self._queue_on_device(tensors)
        x = self._normalised(tensors[0] if len(tensors) == 1 else torch.cat(tensors))
        return PendingBatch(lambda: self._forward_here(x))

    def _forward_here(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Maps of a normalised batch on this thread, and the CPU seconds the model took."""
        with self._lock, torch.inference_mode():
            began = time.thread_time()
            y = self._maps(x)
            model_cpu_s = time.thread_time() - began
        return y, model_cpu_s

    def _queue_on_device(self, tensors: list[torch.Tensor]) -> PendingBatch:
        """Queue copy in, normalisation and forward on the model's stream; nothing waits here."""
        first = tensors[0]
        count = sum(int(t.shape[0]) for t in tensors)
        with self._lock, torch.inference_mode():
            stream = self._stream or torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                x = torch.empty((count, *first.shape[1:]), dtype=first.dtype, device=self.device)
                offset = 0
                for part in tensors:
                    x[offset : offset + part.shape[0]].copy_(part, non_blocking=True)
                    offset += int(part.shape[0])
                x = self._normalised(x)
                began = time.thread_time()
                y = self._maps(x)
                done = torch.cuda.Event()
                done.record(stream)
                launch_cpu_s = time.thread_time() - began

        def wait() -> tuple[torch.Tensor, float]:
            began = time.thread_time()
            done.synchronize()
            del tensors[:]  # the copies in have finished: the host memory they read may go
            # The maps are read on the default stream (stitching, counts): their memory, allocated on the
            # model's stream, must not be reused for that stream's next batch before those reads ran.
            y.record_stream(torch.cuda.default_stream(self.device))
            return y, launch_cpu_s + time.thread_time() - began

        return PendingBatch(wait)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """float32 maps of normalised input, computed in `dtype`."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            y = self.module(x)
        return self._activate(y.float())

    @staticmethod
    def _normalised(x: torch.Tensor) -> torch.Tensor:
        """A channels_last float32 batch: uint8 tiles normalised, float ones (warm-up) laid out."""
        if x.dtype == torch.uint8:
            return normalize_batch(x)
        return x.contiguous(memory_format=torch.channels_last)

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
            maps, _ = self.prepare([x]).result()
            out = maps.cpu().numpy()
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
