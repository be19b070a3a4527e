"""The one image normalisation shared by training and serving, so both see identical tensors.

uint8 RGB (H, W, 3) -> float32 (3, H, W): scaled to [0, 1] then standardised per channel with the
ImageNet mean/std (a well-known, documented choice; models are trained from scratch either way).
"""

from __future__ import annotations

import numpy as np
import torch

MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _check_images(images: np.ndarray, batched: bool) -> None:
    expected = "(N, H, W, 3)" if batched else "(H, W, 3)"
    ndim = 4 if batched else 3
    if images.dtype != np.uint8 or images.ndim != ndim or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image array {expected}, got {images.dtype} {images.shape}")


def _standardise(chw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=torch.float32).view(3, 1, 1)
    return (chw.to(torch.float32) / 255.0 - mean) / std


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W), normalised."""
    _check_images(image, batched=False)
    return _standardise(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))


def batch_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalised."""
    _check_images(images, batched=True)
    return _standardise(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `to_tensor` (for overlays and debugging): float (3, H, W) -> uint8 (H, W, 3)."""
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    rgb = (tensor.detach().cpu().float() * std + mean).clamp(0, 1) * 255.0
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()
