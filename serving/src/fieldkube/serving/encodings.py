"""Compact encodings of maps and masks in responses: run-length masks, float16 arrays, heat-map PNGs."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

# Anchor colours of the heat map (black -> purple -> red -> yellow -> white), interpolated to 256 steps.
_ANCHORS = np.array(
    [[0, 0, 0], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], dtype=np.float64
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Row-major run lengths of a 0/1 mask, starting with a (possibly empty) run of 0s."""
    flat = np.asarray(mask, dtype=np.uint8).ravel()
    if flat.size == 0:
        return {"size": list(mask.shape), "order": "row-major", "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": [int(s) for s in mask.shape], "order": "row-major", "counts": runs}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of `mask_to_rle`."""
    height, width = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, rle["counts"])
    if flat.size != height * width:
        raise ValueError(f"RLE counts cover {flat.size} pixels, size says {height}x{width}")
    return flat.reshape(height, width)


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a 0/1 mask: column-major runs as COCO's LEB128-like string.

    Encoded by pycocotools itself, so `pycocotools.mask.decode` (and every COCO tool) reads it back.
    """
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    counts = encoded["counts"]
    return {
        "size": [int(s) for s in encoded["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
    }


def sum_pool(density: np.ndarray, stride: int) -> np.ndarray:
    """Sum over stride x stride blocks (partial blocks at the edges included): keeps the total count."""
    if stride == 1:
        return density.astype(np.float32)
    height, width = density.shape
    pad_h, pad_w = -height % stride, -width % stride
    padded = np.pad(density.astype(np.float64), ((0, pad_h), (0, pad_w)))
    blocks = padded.reshape(padded.shape[0] // stride, stride, padded.shape[1] // stride, stride)
    return blocks.sum(axis=(1, 3)).astype(np.float32)


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """A 2-D float map as base64 of little-endian float16, with its shape."""
    data = np.ascontiguousarray(values, dtype="<f2").tobytes()
    return {
        "shape": [int(s) for s in values.shape],
        "dtype": "float16",
        "byte_order": "little",
        "data": base64.b64encode(data).decode("ascii"),
    }


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_array` (float32)."""
    raw = base64.b64decode(payload["data"])
    return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(payload["shape"])


def heatmap(values: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) colour image of a non-negative map, scaled to its own maximum."""
    top = float(np.max(values)) if values.size else 0.0
    scaled = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)
    out: np.ndarray = _LUT[np.round(scaled * 255).astype(np.uint8)]
    return out


def data_url_png(png: bytes) -> str:
    """A PNG as a data: URL (for JSON responses and the web page)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
