"""Run a model over an image of any size by tiling, batching and stitching: the reference inference path.

Used by the trainer's evaluation and by tests; the service batches tiles across requests itself but
uses the same `tile_boxes` / `stitch`, so both produce the same maps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from fieldkube.vision.normalize import batch_to_tensor
from fieldkube.vision.tiling import Blend, stitch, tile_boxes

Activation = Literal["identity", "sigmoid"]


def pad_image_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad an (H, W, 3) image at the bottom/right to at least (height, width)."""
    pad_h, pad_w = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if pad_h == 0 and pad_w == 0:
        return image
    widths = ((0, pad_h), (0, pad_w), (0, 0))
    if pad_h < image.shape[0] and pad_w < image.shape[1]:
        return np.pad(image, widths, mode="reflect")
    return np.pad(image, widths, mode="edge")


@torch.no_grad()
def predict_tiled(
    model: nn.Module,
    image: np.ndarray,
    tile: int = 224,
    overlap: int = 32,
    batch_size: int = 8,
    activation: Activation = "identity",
    blend: Blend = "cosine",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Full-size (H, W) float32 map for a uint8 (H, W, 3) image.

    The image is cut into `tile`-sized boxes with `overlap` (last row/column shifted inside; images
    smaller than a tile are padded), run through `model` in batches of `batch_size`, passed through
    `activation` ("sigmoid" for segmenter logits -> probabilities) and blended back with `stitch`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    height, width = image.shape[:2]
    padded = pad_image_to(image, tile, tile)
    boxes = tile_boxes(padded.shape[0], padded.shape[1], tile, overlap, mode="shift")
    target = device if device is not None else next(model.parameters()).device
    outputs: list[np.ndarray] = []
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        crops = np.stack([padded[y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
        result = model(batch_to_tensor(crops).to(target))
        if activation == "sigmoid":
            result = torch.sigmoid(result)
        outputs.append(result.float().cpu().numpy())
    stitched = stitch(outputs, boxes, padded.shape[0], padded.shape[1], blend=blend)
    return stitched[0, :height, :width]


@torch.no_grad()
def predict_whole(model: nn.Module, image: np.ndarray, activation: Activation = "identity") -> np.ndarray:
    """(H, W) float32 map from one forward pass over the whole image (for checks against tiling)."""
    device = next(model.parameters()).device
    result = model(batch_to_tensor(image[None]).to(device))
    if activation == "sigmoid":
        result = torch.sigmoid(result)
    out: np.ndarray = result[0, 0].float().cpu().numpy()
    return out
