"""A second synthetic field that differs on purpose from `field.py`: the domain-shift benchmark's target.

A counter trained on one crop, camera and season meets another. This generator changes every cue the
first one's counter may rely on, while keeping exact flower points: flowers are pale blue-violet with
five or six rounded petals and a small dark-yellow eye, 5-9 px in radius (the first field: yellow,
four petals, 2-5.5 px); the ground is a dense sward of fine, slanted blades over grey soil, without crop
rows; the light is low and warm, brighter on one side of the frame, with softer contrast. Points are
drawn as in the first field, mostly on the sward, so counts cover the same bins.
"""

from __future__ import annotations

import numpy as np

from fieldkube.vision.synthetic.field import FieldSample, _pixel_centres, _sample_points
from fieldkube.vision.synthetic.noise import blend, smooth_noise, smoothstep, splat

SOIL_RGB = np.array([0.33, 0.31, 0.29], dtype=np.float32)
SWARD_RGB = np.array([0.27, 0.36, 0.20], dtype=np.float32)
EYE_RGB = np.array([0.62, 0.45, 0.05], dtype=np.float32)
WARM_LIGHT = np.array([1.10, 0.98, 0.80], dtype=np.float32)
FLOWER_MIN_RADIUS = 5.0
FLOWER_MAX_RADIUS = 9.0


def _sward(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey soil under a dense sward of slanted blades. Returns (rgb (H, W, 3), cover (H, W) in [0, 1])."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    soil = SOIL_RGB * (0.8 + 0.3 * smooth_noise(rng, height, width, 6.0))[..., None]
    angle = np.float32(rng.uniform(0.9, 1.3))
    wobble = 6.0 * smooth_noise(rng, height, width, 12.0)
    blades = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / 3.1 + wobble)
    cover = smoothstep(0.3, 0.6, 0.6 * smooth_noise(rng, height, width, 30.0) + 0.35 * blades + 0.15)
    tint = smooth_noise(rng, height, width, 60.0)[..., None]
    sward_rgb = SWARD_RGB * (1 + 0.3 * (tint - 0.5) * np.array([0.4, 1.0, 1.6], dtype=np.float32))
    sward = sward_rgb * (0.6 + 0.7 * blades)[..., None]
    return blend(soil, sward, cover), cover


def _draw_flowers(rng: np.random.Generator, rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Pale blue-violet flowers with 5 or 6 rounded petals and a dark-yellow eye, at each (x, y) point."""
    n = len(points)
    if n == 0:
        return rgb
    height, width = rgb.shape[:2]
    size = 2 * int(np.ceil(FLOWER_MAX_RADIUS + 1)) + 1
    dy, dx = _pixel_centres(points, size)
    distance = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    radius = rng.uniform(FLOWER_MIN_RADIUS, FLOWER_MAX_RADIUS, n)[:, None, None]
    petals_n = rng.choice([5, 6], n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    petal_radius = radius * (0.55 + 0.45 * np.abs(np.cos(petals_n * (theta - phase) / 2)) ** 0.7)
    petals = np.clip(petal_radius - distance + 0.5, 0.0, 1.0)
    colour = np.stack([rng.uniform(0.45, 0.62, n), rng.uniform(0.5, 0.65, n), rng.uniform(0.9, 1.0, n)], 1)
    colour *= rng.uniform(0.85, 1.05, n)[:, None]
    alpha, coloured = splat(height, width, points, petals, colour)
    petal_rgb = coloured / np.maximum(alpha, 1e-6)[..., None]
    out = blend(rgb, petal_rgb, alpha)
    eye = np.clip(0.22 * radius - distance + 0.5, 0.0, 1.0)
    eye_alpha, _ = splat(height, width, points, eye)
    return blend(out, EYE_RGB, 0.9 * np.minimum(eye_alpha, 1.0))


def _low_warm_light(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Evening light: a warm tint, brighter towards one side of the frame, contrast pulled towards grey."""
    height, width = rgb.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    ramp = 0.9 + 0.5 * (xs * np.cos(angle) + ys * np.sin(angle))
    lit = rgb * ramp[..., None] * WARM_LIGHT
    grey = lit.mean()
    out: np.ndarray = grey + (lit - grey) * np.float32(rng.uniform(0.7, 0.85))
    return out


def make_shifted_field_image(
    rng: np.random.Generator, height: int, width: int, n_flowers: int
) -> FieldSample:
    """A shifted-domain field image (H, W, 3) uint8 with `n_flowers` flowers and their (x, y) centres."""
    if height < 8 or width < 8:
        raise ValueError(f"field image must be at least 8x8, got {height}x{width}")
    if n_flowers < 0:
        raise ValueError(f"n_flowers must be >= 0, got {n_flowers}")
    rgb, cover = _sward(rng, height, width)
    patchiness = smooth_noise(rng, height, width, 50.0)
    points = _sample_points(rng, cover * (0.3 + patchiness) ** 2, n_flowers)
    rgb = _low_warm_light(rng, _draw_flowers(rng, rgb, points))
    rgb = rgb + 0.02 * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return FieldSample(image=image, points=points.astype(np.float32), hazards=())
