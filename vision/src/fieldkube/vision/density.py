"""Ground-truth density maps for counting: each annotated point becomes a Gaussian that sums to one.

Seed 000 blurs the dot image with a Gaussian normalised to sum 1 (sigma unspecified: ours is a
parameter). Each point's kernel is truncated at `truncate` sigmas, clipped at the image border and then
renormalised, so a map always sums to the number of points inside the image, even at the edges.
Coordinates are (x, y) in pixels with pixel (row i, col j) covering [j, j+1) x [i, i+1).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

DEFAULT_SIGMA = 4.0


def _axis_kernels(centres: np.ndarray, size: int, sigma: float, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-point 1-D kernels along one axis. Returns (indices (N, K) int, weights (N, K) summing to 1)."""
    pixel = np.floor(centres).astype(np.int64)
    offsets = np.arange(-radius, radius + 1, dtype=np.int64)
    indices = pixel[:, None] + offsets[None, :]
    inside = (indices >= 0) & (indices < size)
    if sigma > 0:
        distance = indices + 0.5 - centres[:, None]
        weights = np.exp(-0.5 * (distance / sigma) ** 2) * inside
    else:
        weights = (offsets[None, :] == 0) * inside.astype(np.float64)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(indices, 0, size - 1), weights


def points_inside(points_xy: npt.ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    """The (N, 2) float64 subset of (x, y) points lying inside an image of `shape` = (H, W)."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    height, width = shape
    keep = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
    return points[keep & np.isfinite(points).all(axis=1)]


def density_map_from_points(
    points_xy: npt.ArrayLike, shape: tuple[int, int], sigma: float = DEFAULT_SIGMA, truncate: float = 3.0
) -> np.ndarray:
    """Density map (H, W) float32 whose sum equals the number of points inside the image.

    `points_xy` is (N, 2) in (x, y) pixel coordinates; points outside the image are ignored. sigma=0 puts
    each point's unit mass on its pixel.
    """
    height, width = shape
    if height <= 0 or width <= 0:
        raise ValueError(f"density map shape must be positive (H, W), got {shape}")
    if sigma < 0 or not np.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    points = points_inside(points_xy, shape)
    density = np.zeros(height * width, dtype=np.float64)
    if len(points):
        radius = max(0, int(np.ceil(truncate * sigma)))
        ys, wy = _axis_kernels(points[:, 1], height, sigma, radius)
        xs, wx = _axis_kernels(points[:, 0], width, sigma, radius)
        flat_index = ys[:, :, None] * width + xs[:, None, :]
        weights = wy[:, :, None] * wx[:, None, :]
        density += np.bincount(flat_index.ravel(), weights=weights.ravel(), minlength=height * width)
    return density.reshape(height, width).astype(np.float32)


def count_from_density(density: npt.ArrayLike) -> float:
    """The count a density map represents: its sum (accumulated in float64)."""
    return float(np.sum(np.asarray(density), dtype=np.float64))
