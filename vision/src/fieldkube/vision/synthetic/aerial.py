"""Synthetic aerial tiles (about 0.3 m/pixel) with an exact building mask, in the spirit of Inria.

Layers, bottom to top: ground (grass and bare soil), roads with lane marks, trees, cast shadows, and
buildings as rotated rectangles with two-tone roofs from a palette. The mask is 1 exactly on the
visible roof pixels; roads, trees and shadows are 0. Shapes are drawn in their own bounding windows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from fieldkube.vision.synthetic.noise import blend, smooth_noise, smoothstep, window

GRASS_RGB = np.array([0.30, 0.40, 0.20], dtype=np.float32)
BARE_RGB = np.array([0.55, 0.50, 0.40], dtype=np.float32)
TREE_RGB = np.array([0.16, 0.28, 0.12], dtype=np.float32)
ROOF_PALETTE = np.array(
    [
        [0.62, 0.30, 0.22],  # terracotta
        [0.45, 0.45, 0.47],  # grey
        [0.28, 0.28, 0.30],  # dark grey
        [0.80, 0.79, 0.76],  # white membrane
        [0.50, 0.38, 0.30],  # brown shingle
        [0.34, 0.40, 0.46],  # blue-grey metal
    ],
    dtype=np.float32,
)


class AerialSample(NamedTuple):
    """image: uint8 (H, W, 3); mask: uint8 (H, W) with 1 = building."""

    image: np.ndarray
    mask: np.ndarray


def _ground(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    mix = smoothstep(0.3, 0.7, smooth_noise(rng, height, width, 45.0))
    texture = 0.8 + 0.35 * smooth_noise(rng, height, width, 3.0)
    return blend(np.broadcast_to(GRASS_RGB, (height, width, 3)), BARE_RGB, mix) * texture[..., None]


def _roads(rng: np.random.Generator, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-2 straight asphalt roads with dashed centre lines. Returns (rgb, road mask bool)."""
    height, width = rgb.shape[:2]
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    road = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(0, 3))):
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        across = (xs - cx) * -np.sin(angle) + (ys - cy) * np.cos(angle)
        along = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
        half = rng.uniform(0.02, 0.045) * max(height, width)
        surface = np.abs(across) <= half
        grey = rng.uniform(0.33, 0.48)
        rgb[surface] = np.array([grey, grey, grey * 1.03], dtype=np.float32)
        rgb[(np.abs(across) < 0.8) & (np.mod(along, 14.0) < 7.0)] = np.array([0.9, 0.88, 0.8], np.float32)
        road |= surface
    return rgb, road


def _trees(rng: np.random.Generator, rgb: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """Round tree crowns with soft edges, each casting a round shadow away from the sun."""
    height, width = rgb.shape[:2]
    crowns = np.zeros((height, width), dtype=np.float32)
    shade = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(rng.uniform(2, 14) * height * width / 224**2)):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4.0, 12.0)
        for layer, (y, x) in ((shade, (cy + sun[0] * r, cx + sun[1] * r)), (crowns, (cy, cx))):
            found = window(y, x, r, height, width)
            if found is not None:
                where, ys, xs = found
                layer[where] = np.maximum(layer[where], np.clip(r - np.hypot(ys - y, xs - x), 0, 1))
    rgb = rgb * (1 - 0.45 * shade[..., None])
    leaf = TREE_RGB * (0.7 + 0.6 * smooth_noise(rng, height, width, 2.5))[..., None]
    return blend(rgb, leaf, crowns)


def _rectangle(
    ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, half_h: float, half_w: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inside test of pixel centres for a rotated rectangle, and the across-ridge coordinate."""
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h), v


def make_aerial_scene(rng: np.random.Generator, height: int, width: int) -> AerialSample:
    """A synthetic aerial tile (H, W, 3) uint8 and its exact building mask (H, W) uint8 in {0, 1}."""
    if height < 16 or width < 16:
        raise ValueError(f"aerial scene must be at least 16x16, got {height}x{width}")
    sun_angle = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.sin(sun_angle), np.cos(sun_angle)])
    rgb, road = _roads(rng, _ground(rng, height, width))
    rgb = _trees(rng, rgb, sun)

    mask = np.zeros((height, width), dtype=bool)
    shadow = np.zeros((height, width), dtype=bool)
    roof_rgb = np.zeros((height, width, 3), dtype=np.float32)
    grid_angle = rng.uniform(0, np.pi / 2)
    for _ in range(int(rng.uniform(2, 9) * height * width / 224**2) + 1):
        half_h, half_w = rng.uniform(5.0, 16.0), rng.uniform(6.0, 24.0)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if road[int(cy), int(cx)]:
            continue
        angle = grid_angle + rng.integers(2) * np.pi / 2 + rng.normal(0, 0.05)
        lift = rng.uniform(3.0, 12.0)
        reach = float(np.hypot(half_h, half_w))
        for step in np.linspace(0.25, 1.0, 4):
            sy, sx = cy + sun[0] * lift * step, cx + sun[1] * lift * step
            found = window(sy, sx, reach, height, width)
            if found is not None:
                where, ys, xs = found
                shadow[where] |= _rectangle(ys, xs, sy, sx, half_h, half_w, angle)[0]
        found = window(cy, cx, reach, height, width)
        if found is None:
            continue
        where, ys, xs = found
        inside, across = _rectangle(ys, xs, cy, cx, half_h, half_w, angle)
        colour = ROOF_PALETTE[rng.integers(len(ROOF_PALETTE))] * rng.uniform(0.85, 1.1)
        ridge = np.where(across > 0, 1.0, rng.uniform(0.72, 0.9)).astype(np.float32)
        roof_rgb[where][inside] = colour[None, :] * ridge[inside][:, None]  # basic slice: a view
        mask[where] |= inside
    rgb[shadow & ~mask] *= 0.5
    texture = 0.92 + 0.16 * smooth_noise(rng, height, width, 2.0)
    rgb[mask] = (roof_rgb * texture[..., None])[mask]
    rgb = ndimage.gaussian_filter(rgb, sigma=(0.5, 0.5, 0.0))
    rgb += 0.012 * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return AerialSample(image=image, mask=mask.astype(np.uint8))
