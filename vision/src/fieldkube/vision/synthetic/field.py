"""Synthetic in-field canola images with exact flower points and the seed-000 failure cases.

Layers, bottom to top: soil, crop rows of textured leaves, yellow four-petal flowers of varied size,
colour and density (placed mostly on the canopy), then the optional hazards the classical counter
mistakes for flowers or misses: "glare" (bright specular blobs on leaves), "dust" (light roadside
speckle and haze along one edge) and "shadow" (large soft dark patches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fieldkube.vision.synthetic.noise import blend, smooth_noise, smoothstep, splat

HAZARDS: tuple[str, ...] = ("glare", "dust", "shadow")

SOIL_RGB = np.array([0.42, 0.31, 0.21], dtype=np.float32)
LEAF_RGB = np.array([0.20, 0.42, 0.14], dtype=np.float32)
FLOWER_MAX_RADIUS = 5.5


class FieldSample(NamedTuple):
    """image: uint8 (H, W, 3); points: float32 (N, 2) flower centres as (x, y); hazards drawn."""

    image: np.ndarray
    points: np.ndarray
    hazards: tuple[str, ...]


def _pixel_centres(centres_xy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) each (N, P, P): offsets of patch pixel centres from each sub-pixel centre."""
    offsets = np.arange(size) - size // 2
    frac = centres_xy - np.floor(centres_xy)
    dx = offsets[None, None, :] + 0.5 - frac[:, 0, None, None]
    dy = offsets[None, :, None] + 0.5 - frac[:, 1, None, None]
    return np.broadcast_to(dy, (len(centres_xy), size, size)), np.broadcast_to(
        dx, (len(centres_xy), size, size)
    )


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Soil with crop rows of leaves. Returns (rgb float (H, W, 3), canopy cover (H, W) in [0, 1])."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    soil_shade = (
        0.75 + 0.4 * smooth_noise(rng, height, width, 24.0) + 0.1 * rng.random((height, width), np.float32)
    )
    soil = SOIL_RGB * soil_shade[..., None]

    angle = np.float32(rng.uniform(-0.5, 0.5) + (np.pi / 2 if rng.random() < 0.5 else 0.0))
    period = np.float32(rng.uniform(18.0, 40.0))
    across = xs * np.cos(angle) + ys * np.sin(angle)
    rows = 0.5 + 0.5 * np.cos(2 * np.pi * across / period)
    cover = rng.uniform(0.55, 0.95)
    canopy = smoothstep(0.35, 0.65, cover * (0.5 * rows + 0.5 * smooth_noise(rng, height, width, 10.0)) + 0.3)

    leaf_texture = smooth_noise(rng, height, width, 3.0)
    tint = smooth_noise(rng, height, width, 40.0)[..., None]
    leaf_rgb = LEAF_RGB * (1 + 0.25 * (tint - 0.5) * np.array([1.5, 0.5, 0.0], dtype=np.float32))
    leaves = leaf_rgb * (0.55 + 0.8 * leaf_texture)[..., None]
    return blend(soil, leaves, canopy), canopy


def _sample_points(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """n sub-pixel (x, y) points drawn with probability proportional to `weight` (H, W)."""
    width = weight.shape[1]
    p = weight.ravel().astype(np.float64) + 1e-3
    flat = rng.choice(p.size, size=n, p=p / p.sum())
    jitter = rng.random((n, 2))
    return np.stack([flat % width + jitter[:, 0], flat // width + jitter[:, 1]], axis=1)


def _draw_flowers(rng: np.random.Generator, rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Four-petal yellow flowers with an orange centre, radius 2-5.5 px, at each (x, y) point."""
    n = len(points)
    if n == 0:
        return rgb
    height, width = rgb.shape[:2]
    size = 2 * int(np.ceil(FLOWER_MAX_RADIUS + 1)) + 1
    dy, dx = _pixel_centres(points, size)
    distance = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    radius = rng.uniform(2.0, FLOWER_MAX_RADIUS, n)[:, None, None]
    phase = rng.uniform(0, np.pi, n)[:, None, None]
    petal_radius = radius * (0.7 + 0.3 * np.abs(np.cos(2 * (theta - phase))))
    petals = np.clip(petal_radius - distance + 0.5, 0.0, 1.0)
    colour = np.stack([rng.uniform(0.9, 1.0, n), rng.uniform(0.7, 0.93, n), rng.uniform(0.0, 0.22, n)], 1)
    colour *= rng.uniform(0.78, 1.05, n)[:, None]
    alpha, coloured = splat(height, width, points, petals, colour)
    petal_rgb = coloured / np.maximum(alpha, 1e-6)[..., None]
    out = blend(rgb, petal_rgb, alpha)
    centre = np.clip(0.35 * radius - distance + 0.5, 0.0, 1.0)
    centre_alpha, _ = splat(height, width, points, centre)
    return blend(out, np.array([0.85, 0.55, 0.08]), 0.7 * np.minimum(centre_alpha, 1.0))


def _draw_glare(rng: np.random.Generator, rgb: np.ndarray, canopy: np.ndarray) -> np.ndarray:
    """Specular highlights on leaves: bright white-yellow elongated blobs about flower-sized."""
    height, width = canopy.shape
    n = max(1, int(rng.uniform(8, 25) * height * width / 224**2))
    centres = _sample_points(rng, canopy**2, n)
    size = 15
    dy, dx = _pixel_centres(centres, size)
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    major = rng.uniform(1.5, 4.0, n)[:, None, None]
    minor = major / rng.uniform(1.0, 2.5, n)[:, None, None]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    blob = (
        1.6 * np.exp(-0.5 * ((u / major) ** 2 + (v / minor) ** 2)) * rng.uniform(0.7, 1.0, n)[:, None, None]
    )
    alpha, _ = splat(height, width, centres, blob)
    return blend(rgb, np.array([1.0, 0.98, 0.86]), np.minimum(alpha, 1.0))


def _draw_dust(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Roadside dust: a light haze and fine bright speckle fading in from one image edge."""
    height, width = rgb.shape[:2]
    ys = np.arange(height, dtype=np.float32)[:, None] + np.zeros((1, width), np.float32)
    xs = np.arange(width, dtype=np.float32)[None, :] + np.zeros((height, 1), np.float32)
    edge = int(rng.integers(4))
    depth = [ys / height, 1 - ys / height, xs / width, 1 - xs / width][edge]
    band = smoothstep(0.35, 1.0, 1 - depth + 0.25 * smooth_noise(rng, height, width, 30.0))
    dust_rgb = np.array([0.86, 0.8, 0.64])
    out = blend(rgb, dust_rgb, rng.uniform(0.15, 0.35) * band)
    n = int(rng.uniform(0.0015, 0.005) * height * width)
    centres = _sample_points(rng, band, n)
    size = 5
    dy, dx = _pixel_centres(centres, size)
    sigma = rng.uniform(0.5, 1.3, n)[:, None, None]
    speck = np.exp(-0.5 * (dx**2 + dy**2) / sigma**2) * rng.uniform(0.5, 1.0, n)[:, None, None]
    alpha, _ = splat(height, width, centres, speck)
    return blend(out, np.array([0.97, 0.93, 0.78]), np.minimum(alpha, 1.0))


def _draw_shadow(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Large soft shadows (clouds, poles, neighbouring plants) that darken and blue-shift the scene."""
    height, width = rgb.shape[:2]
    field = smooth_noise(rng, height, width, rng.uniform(40.0, 90.0))
    threshold = rng.uniform(0.45, 0.7)
    shadow = smoothstep(threshold - 0.06, threshold + 0.06, field) * rng.uniform(0.35, 0.6)
    tint = np.array([0.0, 0.0, 0.12], dtype=np.float32)
    out: np.ndarray = rgb * (1 - shadow[..., None]) * (1 + tint * shadow[..., None])
    return out


def make_field_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_flowers: int,
    hazards: Sequence[str] = HAZARDS,
) -> FieldSample:
    """A synthetic field image (H, W, 3) uint8 with `n_flowers` flowers and their exact (x, y) centres.

    Each listed hazard ("glare", "dust", "shadow") is drawn; pass ``hazards=()`` for a clean image.
    """
    if height < 8 or width < 8:
        raise ValueError(f"field image must be at least 8x8, got {height}x{width}")
    if n_flowers < 0:
        raise ValueError(f"n_flowers must be >= 0, got {n_flowers}")
    unknown = sorted(set(hazards) - set(HAZARDS))
    if unknown:
        raise ValueError(f"unknown hazard(s) {', '.join(unknown)}: expected some of {', '.join(HAZARDS)}")
    rgb, canopy = _background(rng, height, width)
    patchiness = smooth_noise(rng, height, width, 50.0)
    points = _sample_points(rng, canopy * (0.3 + patchiness) ** 2, n_flowers)
    if "glare" in hazards:
        rgb = _draw_glare(rng, rgb, canopy)
    rgb = _draw_flowers(rng, rgb, points)
    if "dust" in hazards:
        rgb = _draw_dust(rng, rgb)
    if "shadow" in hazards:
        rgb = _draw_shadow(rng, rgb)
    rgb = rgb + 0.012 * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    drawn = tuple(h for h in HAZARDS if h in hazards)
    return FieldSample(image=image, points=points.astype(np.float32), hazards=drawn)
