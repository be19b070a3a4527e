"""The one image normalisation shared by training and serving, so both see identical tensors.

uint8 RGB (H, W, 3) -> float32 (3, H, W): scaled to [0, 1] then standardised per channel with the
ImageNet mean/std (a well-known, documented choice; models are trained from scratch either way).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _check_images(images: np.ndarray, batched: bool) -> None:
    expected = "(N, H, W, 3)" if batched else "(H, W, 3)"
    ndim = 4 if batched else 3
    if images.dtype != np.uint8 or images.ndim != ndim or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image array {expected}, got {images.dtype} {images.shape}")


def standardise_(pixels: torch.Tensor) -> torch.Tensor:
    """float32 (..., 3, H, W) samples on the 0..255 scale -> normalised, in place.

    One scale and one shift per channel, x / (255 std) - mean / std: two passes over the floats. The
    trainer's batched finish (`jitter_and_normalise_`) ends here too, so a tile served and the same tile
    trained on without jitter are the same tensor, bit for bit."""
    scale, shift = _scale_and_shift(pixels.device)
    return pixels.mul_(scale.view(3, 1, 1)).sub_(shift.view(3, 1, 1))


@functools.cache
def _scale_and_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (3,) per-channel 1 / (255 std) and mean / std, made once per device.

    Made here, not per batch: a tensor built from Python numbers on a GPU is a copy from pageable host
    memory, which waits for everything already queued on the stream, so per batch it would stop the
    host from queueing the next batch while one runs. Computed on the CPU in float32 (IEEE division:
    the same bits a GPU computes)."""
    std = torch.tensor(STD_RGB, dtype=torch.float32)
    scale, shift = 1 / (255.0 * std), torch.tensor(MEAN_RGB, dtype=torch.float32) / std
    return scale.to(device), shift.to(device)


@functools.cache
def _row_scale_and_shift(device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_scale_and_shift` repeated along a row of `width` interleaved RGB pixels (made once per width)."""
    scale, shift = _scale_and_shift(device)
    return scale.repeat(width), shift.repeat(width)


_CPU_BLOCK_FLOATS = 1 << 17
"""Floats normalised per block on a CPU (512 KiB): converted, scaled and shifted while still in cache,
instead of three passes over the whole batch in memory (1.1-1.5x faster for 4-32 tiles of 224-256 px:
bench/README.md)."""


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W), normalised: a batch of one, channels_last like every batch."""
    _check_images(image, batched=False)
    return normalize_batch(torch.from_numpy(np.ascontiguousarray(image))[None])[0]


def batch_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalised."""
    _check_images(images, batched=True)
    return normalize_batch(torch.from_numpy(np.ascontiguousarray(images)))


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 tensor (N, H, W, 3) -> normalised float32 (N, 3, H, W), channels_last, on the same device.

    What the service runs where its model is: uint8 tiles travel to a GPU at a quarter of float32's
    bytes and are normalised there. The result keeps the pixels' interleaved order in memory (an
    (N, 3, H, W) view of (N, H, W, 3) floats): the channels_last layout the models run fastest in, on
    CPUs (oneDNN) as on GPUs (cuDNN), reached without a transpose. Its values equal `standardise_`'s over
    the contiguous layout, bit for bit."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 tensor (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    count, height, width, _ = images.shape
    # (R, W * 3) rows of interleaved samples: the per-channel constants repeat along a long contiguous
    # axis, the same speed as over planar channels without transposing the pixels
    rows = images.contiguous().reshape(count * height, width * 3)
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    scale, shift = _row_scale_and_shift(rows.device, width)
    # one pass each over the whole batch on a GPU; on a CPU, block by block while it is in cache
    step = rows.shape[0] if rows.device.type != "cpu" else max(1, _CPU_BLOCK_FLOATS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        # standardise_'s arithmetic, element for element: times the channel's scale, minus its shift
        out[start : start + step].copy_(rows[start : start + step]).mul_(scale).sub_(shift)
    return out.view(count, height, width, 3).permute(0, 3, 1, 2)


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `to_tensor` (for overlays and debugging): float (3, H, W) -> uint8 (H, W, 3)."""
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    rgb = (tensor.detach().cpu().float() * std + mean).clamp(0, 1) * 255.0
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()
