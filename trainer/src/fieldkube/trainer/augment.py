"""Turn a batch of decoded tiles into model inputs and targets, on whichever device trains.

The loader's workers only decode and copy pixels (`RawBatch`); everything else happens here, once per
batch, in torch: flips and quarter turns, density maps built from the (turned) points, colour jitter and
normalisation. On a GPU this runs on the GPU, so the CPU cost per sample is the PNG decode alone; on a
CPU it runs in the loader workers. The same functions serve both, so both paths train on the same data.

What a sample becomes depends only on (seed, epoch, sample index) (`draw_params`), never on the batch it
sits in or the rank that loads it: 1 rank and N ranks see identical samples, and a resumed run continues
exactly. Density maps follow `fieldkube.vision.density` (each point a Gaussian truncated at 3 sigma,
clipped at the tile border and renormalised, so a map sums to its number of points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from fieldkube.contract.config import DataConfig
from fieldkube.vision.normalize import standardise_

# Columns of a sample's parameters: flip left-right, flip up-down, quarter turns (counter-clockwise, as
# np.rot90), brightness, contrast and saturation factors. Identity: 0, 0, 0, 1, 1, 1.
HFLIP, VFLIP, TURNS, BRIGHTNESS, CONTRAST, SATURATION = range(6)
IDENTITY = (0.0, 0.0, 0.0, 1.0, 1.0, 1.0)
TRUNCATE = 3.0
CPU_CHUNK = 4


@dataclass(frozen=True)
class Augment:
    hflip: bool
    vflip: bool
    rot90: bool
    color_jitter: float

    @classmethod
    def from_config(cls, data: DataConfig) -> Augment:
        return cls(data.hflip, data.vflip, data.rot90, data.color_jitter)


def draw_params(seed: int, epoch: int, index: int, augment: Augment | None, square: bool) -> np.ndarray:
    """The augmentation of sample ``index`` in ``epoch`` (6 float32, see IDENTITY); epoch -1 or no
    ``augment`` gives the identity (validation, test). One generator per (seed, epoch, index)."""
    params = np.array(IDENTITY, dtype=np.float32)
    if augment is None or epoch < 0:
        return params
    rng = np.random.default_rng([seed, epoch, index])
    flips = rng.random(2)
    params[HFLIP] = float(augment.hflip and flips[0] < 0.5)
    params[VFLIP] = float(augment.vflip and flips[1] < 0.5)
    turns = int(rng.integers(0, 4))
    params[TURNS] = float(turns if augment.rot90 and square else 0)
    if augment.color_jitter > 0:
        strength = augment.color_jitter
        params[BRIGHTNESS : SATURATION + 1] = 1 + rng.uniform(-strength, strength, size=3)
    return params


@dataclass
class RawBatch:
    """Decoded tiles of one batch as the workers hand them over (uint8: a quarter of float32's bytes).

    ``points`` are (P, 3) float32 rows of (sample in batch, x, y) in tile pixels (counters); ``masks``
    are (B, H, W) uint8 {0, 1} (segmenters). ``geometry`` and ``jittered`` repeat, as plain Python
    values, what ``params`` says, so that finishing a batch on a GPU never waits to read them back.
    """

    images: torch.Tensor  # (B, H, W, 3) uint8
    params: torch.Tensor  # (B, 6) float32
    points: torch.Tensor  # (P, 3) float32
    masks: torch.Tensor | None
    geometry: list[tuple[bool, bool, int]]
    jittered: bool
    loader_cpu_s: float = 0.0  # CPU seconds the worker spent on this batch (the trainer reports it)

    @classmethod
    def build(
        cls,
        images: torch.Tensor,
        params: np.ndarray,
        points: torch.Tensor,
        masks: torch.Tensor | None,
        loader_cpu_s: float = 0.0,
    ) -> RawBatch:
        geometry = [(bool(h), bool(v), int(t)) for h, v, t in params[:, :3].tolist()]
        jittered = bool((params[:, BRIGHTNESS:] != 1).any())
        return cls(images, torch.from_numpy(params), points, masks, geometry, jittered, loader_cpu_s)

    def to(self, device: torch.device, non_blocking: bool = False) -> RawBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        masks = None if self.masks is None else move(self.masks)
        return replace(
            self, images=move(self.images), params=move(self.params), points=move(self.points), masks=masks
        )

    def pin_memory(self) -> RawBatch:
        """Called by torch's DataLoader (pin_memory=True) so the copy to the GPU can overlap compute."""
        masks = None if self.masks is None else self.masks.pin_memory()
        return replace(
            self,
            images=self.images.pin_memory(),
            params=self.params.pin_memory(),
            points=self.points.pin_memory(),
            masks=masks,
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _turn(hwc: torch.Tensor, hflip: bool, vflip: bool, turns: int) -> torch.Tensor:
    """Flip and turn one (H, W[, C]) tile as np.fliplr / np.flipud / np.rot90 do, in that order."""
    if hflip:
        hwc = hwc.flip(1)
    if vflip:
        hwc = hwc.flip(0)
    if turns:
        hwc = torch.rot90(hwc, turns, dims=(0, 1))
    return hwc


def _turn_points(points: torch.Tensor, params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Move (sample, x, y) points with their tiles; a pixel's centre maps to the moved pixel's centre."""
    if len(points) == 0:
        return points
    sample = points[:, 0].long()
    x, y = points[:, 1], points[:, 2]
    # Points outside their tile stay outside (dropped by density_maps), whatever the turn.
    outside = ~((x >= 0) & (x < width) & (y >= 0) & (y < height))
    x, y = x.masked_fill(outside, math.nan), y.masked_fill(outside, math.nan)
    p = params[sample]
    x = torch.where(p[:, HFLIP] > 0, width - x, x)
    y = torch.where(p[:, VFLIP] > 0, height - y, y)
    turns = p[:, TURNS].long()
    # np.rot90 by one turn (counter-clockwise): new[i, j] = old[j, W-1-i], i.e. (x, y) -> (y, W - x)
    # on a square tile (turns are only drawn for square tiles). Apply 0-3 turns without branching.
    for k in range(1, 4):
        once = turns >= k
        x, y = torch.where(once, y, x), torch.where(once, width - x, y)
    # A point on a pixel's left/top edge lands on the right/bottom edge of the mirrored pixel, which
    # belongs to the next pixel ([j, j+1)); keep it in the tile.
    x, y = x.clamp(max=width - 1e-3), y.clamp(max=height - 1e-3)
    return torch.stack([points[:, 0], x, y], dim=1)


def density_maps(
    points: torch.Tensor, batch: int, height: int, width: int, sigma: float, scale: float = 1.0
) -> torch.Tensor:
    """(B, 1, H, W) float32 maps: each (sample, x, y) point adds ``scale`` of mass in a Gaussian.

    The separable per-point kernels of fieldkube.vision.density, for a whole batch in one scatter-add.
    """
    out = torch.zeros(batch * height * width, dtype=torch.float32, device=points.device)
    inside = (
        (points[:, 1] >= 0) & (points[:, 1] < width) & (points[:, 2] >= 0) & (points[:, 2] < height)
    ) & torch.isfinite(points).all(dim=1)
    points = points[inside]
    if len(points):
        radius = max(0, math.ceil(TRUNCATE * sigma))
        rows, wy = _axis_kernels(points[:, 2], height, sigma, radius)
        cols, wx = _axis_kernels(points[:, 1], width, sigma, radius)
        base = points[:, 0].long()[:, None, None] * (height * width)
        flat = base + rows[:, :, None] * width + cols[:, None, :]
        weights = (wy[:, :, None] * wx[:, None, :]) * scale
        out.index_add_(0, flat.reshape(-1), weights.reshape(-1).to(torch.float32))
    return out.view(batch, 1, height, width)


def _axis_kernels(
    centres: torch.Tensor, size: int, sigma: float, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    centres = centres.to(torch.float64)
    offsets = torch.arange(-radius, radius + 1, device=centres.device)
    indices = torch.floor(centres).long()[:, None] + offsets[None, :]
    inside = (indices >= 0) & (indices < size)
    if sigma > 0:
        distance = indices + 0.5 - centres[:, None]
        weights = torch.exp(-0.5 * (distance / sigma) ** 2) * inside
    else:
        weights = (offsets[None, :] == 0) * inside.to(torch.float64)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return indices.clamp(0, size - 1), weights


def jitter_and_normalise_(pixels: torch.Tensor, params: torch.Tensor, jittered: bool = True) -> torch.Tensor:
    """float32 (B, 3, H, W) samples on the 0..255 scale -> normalised, with each sample's colour jitter,
    in place.

    Saturation, contrast and brightness are linear in the pixels, so together they are one 3x3 colour
    matrix plus an offset per sample, clipped to [0, 255] before the normalisation serving applies too.
    Nothing here depends on the batch size or the thread count beyond rounding in the last bit: the
    image mean is an exact integer sum, and the result is not re-quantised to 8-bit levels (a floor
    would turn such a last-bit difference into a whole level, and 1 rank would no longer equal N).
    In place: on a CPU a new tensor per step is one more pass and fresh pages to fault in.
    """
    if jittered:
        batch = pixels.shape[0]
        b, c, s = params[:, BRIGHTNESS], params[:, CONTRAST], params[:, SATURATION]
        # gray + (p - gray) * s, then (q - mean) * c + mean, then * b; the mean of q equals that of p.
        # Per channel: b*c*s * p + b*c*(1-s)/3 * (sum over channels of p) + b*(1-c) * mean(p).
        # Exact in any summation order: a pixel row sums to at most 255 x W < 2^24 (exact in float32),
        # the rows' sums add up exactly in float64.
        rows = pixels.view(batch, -1, pixels.shape[-1]).sum(dim=2)
        mean = rows.double().sum(dim=1).div_(pixels[0].numel()).float()
        own, shared, offset = b * c * s, b * c * (1 - s) / 3, b * (1 - c) * mean
        gray = pixels.sum(dim=1, keepdim=True).mul_(shared.view(-1, 1, 1, 1)).add_(offset.view(-1, 1, 1, 1))
        torch.addcmul(gray, pixels, own.view(-1, 1, 1, 1), out=pixels).clamp_(0, 255)
    return standardise_(pixels)


def finish_batch(
    raw: RawBatch, task: str, sigma: float, density_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, 3, H, W) float32, targets (B, 1, H, W) float32) on ``raw``'s device.

    Counter targets are density maps times ``density_scale``; segmenter targets are {0, 1} masks.
    """
    batch, height, width = raw.images.shape[:3]
    device = raw.images.device
    masks = raw.masks
    turned = any(h or v or t for h, v, t in raw.geometry)
    if turned and masks is not None:
        masks = torch.stack([_turn(masks[i], *raw.geometry[i]) for i in range(batch)])
    inputs = torch.empty((batch, 3, height, width), dtype=torch.float32, device=device)
    # On a CPU, a few samples at a time keep the float32 intermediates in cache (a batch of 32
    # 256 px tiles is 25 MB); a GPU takes the whole batch at once.
    step = CPU_CHUNK if device.type == "cpu" else batch
    for start in range(0, batch, step):
        end = min(batch, start + step)
        pixels = inputs[start:end]
        # uint8 HWC -> float32 CHW in one copy; a turned tile is read through its turn (a quarter turn is
        # a transposed view), not copied turned first.
        if turned:
            for i in range(start, end):
                pixels[i - start].copy_(_turn(raw.images[i], *raw.geometry[i]).permute(2, 0, 1))
        else:
            pixels.copy_(raw.images[start:end].permute(0, 3, 1, 2))
        jitter_and_normalise_(pixels, raw.params[start:end], raw.jittered)
    if task == "counter":
        points = _turn_points(raw.points, raw.params, height, width)
        targets = density_maps(points, batch, height, width, sigma, density_scale)
    else:
        assert masks is not None, "a segmenter batch carries masks"
        targets = masks[:, None].to(torch.float32)
    return inputs, targets
