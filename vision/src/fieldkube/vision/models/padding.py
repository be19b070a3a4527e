"""Let fully convolutional models accept any input size by padding to a multiple and cropping back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) batch at the bottom/right so that H and W are multiples of `multiple`."""
    height, width = x.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop a (B, C, H', W') batch back to its top-left (H, W) window."""
    return x[..., :height, :width]
