"""Cheap smooth random fields and soft shapes, the building blocks of the synthetic images."""

from __future__ import annotations

import numpy as np


def _interpolation(length: int, scale: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Coarse-grid index (length,) and eased (C1) weight of the next cell for each output position."""
    position = np.arange(length, dtype=np.float32) / np.float32(scale) + np.float32(offset)
    index = np.floor(position).astype(np.int64)
    t = position - index
    return index, t * t * (3.0 - 2.0 * t)


def smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A (H, W) float32 random field in [0, 1] whose features are roughly `scale` pixels wide.

    Value noise: a coarse random grid interpolated separably with gathers (no BLAS, fast at any scale).
    """
    iy, ty = _interpolation(height, scale, float(rng.random()))
    ix, tx = _interpolation(width, scale, float(rng.random()))
    coarse = rng.random((int(iy[-1]) + 2, int(ix[-1]) + 2), dtype=np.float32)
    rows = coarse[iy] * (1 - ty[:, None]) + coarse[iy + 1] * ty[:, None]
    field = rows[:, ix] * (1 - tx[None, :]) + rows[:, ix + 1] * tx[None, :]
    low, high = float(field.min()), float(field.max())
    return ((field - low) / max(high - low, 1e-6)).astype(np.float32)


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 (x <= edge0) to 1 (x >= edge1)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def splat(
    height: int, width: int, centres_xy: np.ndarray, patches: np.ndarray, values: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Add N square patches (N, P, P) centred at integer pixel `centres_xy` (N, 2) into an (H, W) map.

    Returns (sum of patches, sum of patch * value (H, W, C)) where `values` is (N, C); parts of patches
    outside the image are dropped. Fully vectorised with bincount.
    """
    n, size = patches.shape[0], patches.shape[1]
    half = size // 2
    offsets = np.arange(size) - half
    ys = np.floor(centres_xy[:, 1]).astype(np.int64)[:, None, None] + offsets[None, :, None]
    xs = np.floor(centres_xy[:, 0]).astype(np.int64)[:, None, None] + offsets[None, None, :]
    ys, xs = np.broadcast_arrays(ys, xs)
    inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    flat = (ys * width + xs)[inside]
    weights = patches[inside]
    alpha = np.bincount(flat, weights=weights, minlength=height * width).reshape(height, width)
    channels = 0 if values is None else values.shape[1]
    coloured = np.zeros((height, width, channels))
    if values is not None:
        per_pixel = np.broadcast_to(values[:, None, None, :], (n, size, size, channels))[inside]
        for c in range(channels):
            coloured[..., c] = np.bincount(
                flat, weights=weights * per_pixel[:, c], minlength=height * width
            ).reshape(height, width)
    return alpha, coloured


def blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite `colour` (H, W, 3) or (3,) over `base` (H, W, 3) with `alpha` (H, W) in [0, 1].

    Returns float32.
    """
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32, copy=False)
    colour = np.asarray(colour, dtype=np.float32)
    out = np.empty(base.shape, dtype=np.float32)
    for channel in range(3):
        # Per channel: numpy is slow when the innermost broadcast axis has length 3.
        plane = base[..., channel]
        tint = colour[channel] if colour.ndim == 1 else colour[..., channel]
        out[..., channel] = plane + (tint - plane) * a
    return out


def window(
    cy: float, cx: float, radius: float, height: int, width: int
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """The clipped square window around (cy, cx) and its pixel-centre coordinates (ys, xs), or None."""
    y0, y1 = max(0, int(cy - radius) - 1), min(height, int(cy + radius) + 2)
    x0, x1 = max(0, int(cx - radius) - 1), min(width, int(cx + radius) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    return (slice(y0, y1), slice(x0, x1)), ys, xs
