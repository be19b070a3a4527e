"""The seed-000 classical flower counter, kept as the baseline the CNN must beat.

Pipeline: RGB -> CIE Lab; a sigmoid mapping turns "bright, yellow, not leaf-green" into a [0, 1]
flower-likeness map; Determinant-of-Hessian blob detection (skimage ``blob_doh``) finds flower-sized
blobs; the count is the number of blobs. Its known weakness, reproduced on purpose: sun glare on leaves
and roadside dust are bright and slightly yellow, so they score as flowers; shaded flowers are missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import rgb2lab
from skimage.feature import blob_doh


@dataclass(frozen=True)
class ClassicalParams:
    """Sigmoid centres/widths on Lab channels (L in [0, 100], a/b about [-100, 100]) and blob settings."""

    lightness_centre: float = 70.0
    yellow_centre: float = 12.0
    green_centre: float = -15.0
    width: float = 4.0
    min_sigma: float = 1.5
    max_sigma: float = 6.0
    num_sigma: int = 6
    threshold: float = 0.004


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def flower_likeness(image: np.ndarray, params: ClassicalParams = ClassicalParams()) -> np.ndarray:
    """(H, W) float64 in [0, 1]: sigmoid(L) * sigmoid(b*) * sigmoid(a*) of a uint8 RGB (H, W, 3) image."""
    lab = rgb2lab(image)
    light, red_green, yellow_blue = lab[..., 0], lab[..., 1], lab[..., 2]
    w = params.width
    return (
        _sigmoid((light - params.lightness_centre) / w)
        * _sigmoid((yellow_blue - params.yellow_centre) / w)
        * _sigmoid((red_green - params.green_centre) / w)
    )


def detect_flowers(image: np.ndarray, params: ClassicalParams = ClassicalParams()) -> np.ndarray:
    """(N, 2) float array of detected blob centres (x, y) in pixel coordinates."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    blobs = blob_doh(
        flower_likeness(image, params),
        min_sigma=params.min_sigma,
        max_sigma=params.max_sigma,
        num_sigma=params.num_sigma,
        threshold=params.threshold,
    )
    if len(blobs) == 0:
        return np.zeros((0, 2))
    return np.stack([blobs[:, 1] + 0.5, blobs[:, 0] + 0.5], axis=1)


def count_classical(image: np.ndarray, params: ClassicalParams = ClassicalParams()) -> float:
    """Number of flowers the classical counter finds in a uint8 RGB (H, W, 3) image."""
    return float(len(detect_flowers(image, params)))
