"""Pictures people look at: density heat maps, segmentation masks and annotated points over the image."""

from __future__ import annotations

import numpy as np

# Anchor colours of a perceptually ordered dark-to-bright heat map (black, purple, red, orange, yellow).
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape S) to uint8 RGB (S..., 3) along the heat map."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(v).astype(np.int64), len(_HEAT_ANCHORS) - 2)
    t = (v - low)[..., None]
    rgb = _HEAT_ANCHORS[low] * (1 - t) + _HEAT_ANCHORS[low + 1] * t
    return rgb.round().astype(np.uint8)


def _check(image: np.ndarray, plane: np.ndarray, what: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if plane.shape != image.shape[:2]:
        raise ValueError(f"{what} shape {plane.shape} does not match the image {image.shape[:2]}")


def density_overlay(
    image: np.ndarray, density: np.ndarray, alpha: float = 0.7, vmax: float | None = None
) -> np.ndarray:
    """uint8 (H, W, 3): the density (H, W) as a heat map over the image, transparent where it is zero.

    `vmax` fixes the value shown at full colour (default: the map's 99.9th percentile).
    """
    _check(image, density, "density")
    top = vmax if vmax is not None else float(np.percentile(density, 99.9)) if density.size else 0.0
    level = np.clip(density / top, 0.0, 1.0) if top > 0 else np.zeros_like(density, dtype=np.float32)
    weight = (alpha * np.sqrt(level))[..., None]
    blended = image.astype(np.float32) * (1 - weight) + heat_colours(level).astype(np.float32) * weight
    return blended.round().astype(np.uint8)


def mask_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = (255, 40, 40),
    alpha: float = 0.45,
    threshold: float = 0.5,
) -> np.ndarray:
    """uint8 (H, W, 3): mask (H, W; bool, {0,1}, {0,255} or probabilities) tinted over the image, outlined."""
    _check(image, mask, "mask")
    values = mask.astype(np.float32)
    if values.max(initial=0.0) > 1.0:
        values = values / 255.0
    inside = values >= threshold
    out = image.astype(np.float32)
    out[inside] = out[inside] * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha
    edge = np.zeros_like(inside)
    edge[:-1] |= inside[:-1] != inside[1:]
    edge[:, :-1] |= inside[:, :-1] != inside[:, 1:]
    out[edge & inside] = colour
    return out.round().astype(np.uint8)


def points_overlay(
    image: np.ndarray, points_xy: np.ndarray, colour: tuple[int, int, int] = (255, 0, 255), size: int = 3
) -> np.ndarray:
    """uint8 (H, W, 3): a small cross drawn at each (x, y) point (for checking annotations)."""
    out = image.copy()
    height, width = out.shape[:2]
    for x, y in np.asarray(points_xy, dtype=np.float64).reshape(-1, 2):
        cx, cy = int(x), int(y)
        out[max(cy - size, 0) : min(cy + size + 1, height), min(max(cx, 0), width - 1)] = colour
        out[min(max(cy, 0), height - 1), max(cx - size, 0) : min(cx + size + 1, width)] = colour
    return out
