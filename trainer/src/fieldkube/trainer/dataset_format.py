"""The prepared dataset on disk: Parquet shards per split plus manifest.json, shared by prepare and loader.

Layout of a prepared dataset directory::

    manifest.json                 task, tile, splits -> shard files, row counts, train selection
    shards/<split>-<k:05d>.parquet   one file per split per shard k (written by one worker / Job index)
    shards/shard-<k:05d>.json        completion marker of shard k (row counts, plan fingerprint)

Row columns: id, source, split, tile_row, tile_col, y0, x0, height, width, image, count (counter: points
in the tile; segmenter: building pixel fraction), bin (seed-000 count bin), points (flattened x, y pairs
in tile pixels, counter), mask (segmenter), tags (e.g. "glare,dust"). The manifest's ``pixels`` says how
image and mask are stored: "png" (RGB PNG; the mask white on black) or "raw" (uint8 bytes, tile x tile x 3
for the image, tile x tile of {0, 1} for the mask), which costs the loader no decode.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fieldkube.trainer.errors import DataError
from fieldkube.vision.metrics import COUNT_BINS, count_bin

__all__ = ["COUNT_BINS", "count_bin"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PIXELS = ("png", "raw")


ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("tile_row", pa.int32()),
        ("tile_col", pa.int32()),
        ("y0", pa.int32()),
        ("x0", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("count", pa.float32()),
        ("bin", pa.string()),
        ("points", pa.list_(pa.float32())),
        ("mask", pa.binary()),
        ("tags", pa.string()),
    ]
)


def shard_file(root: Path, split: str, shard: int) -> Path:
    return root / "shards" / f"{split}-{shard:05d}.parquet"


def marker_file(root: Path, shard: int) -> Path:
    return root / "shards" / f"shard-{shard:05d}.json"


def finite(data: Any) -> Any:
    """Replace NaN/inf (undefined metrics) by None so the JSON is strict (readable everywhere)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(finite(data), handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and check a prepared dataset's manifest; errors name the file and what is wrong."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found (prepare the dataset with fieldkube-prepare first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: field 'format': expected {MANIFEST_FORMAT}")
    for key in ("task", "tile", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    return manifest


def encode_tile(image: np.ndarray, pixels: str) -> bytes:
    """A uint8 (t, t, 3) tile as stored in the ``image`` column."""
    from fieldkube.vision.imageio import encode_png

    return image.tobytes() if pixels == "raw" else encode_png(image)


def encode_mask(mask: np.ndarray, pixels: str) -> bytes:
    """A {0, 1} (t, t) mask as stored in the ``mask`` column."""
    from fieldkube.vision.imageio import encode_png

    if pixels == "raw":
        return mask.astype(np.uint8).tobytes()
    return encode_png(np.repeat(mask.astype(np.uint8)[:, :, None] * 255, 3, axis=2))


def decode_tile(value: bytes, pixels: str, tile: int) -> np.ndarray:
    """The uint8 (t, t, 3) tile of an ``image`` cell."""
    from fieldkube.vision.imageio import read_image

    if pixels == "raw":
        return _raw(value, (tile, tile, 3))
    return read_image(value)


def decode_mask(value: bytes, pixels: str, tile: int) -> np.ndarray:
    """The uint8 {0, 1} (t, t) mask of a ``mask`` cell."""
    from fieldkube.vision.imageio import read_image

    if pixels == "raw":
        return _raw(value, (tile, tile))
    return (read_image(value).max(axis=2) > 127).astype(np.uint8)


def _raw(value: bytes, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape)
    if len(value) != expected:
        raise DataError(
            f"a raw tile holds {len(value)} bytes, expected {expected} for {'x'.join(map(str, shape))} uint8 "
            "(manifest.json pixels: raw)"
        )
    return np.frombuffer(value, dtype=np.uint8).reshape(shape).copy()


def pixels_of(manifest: dict[str, Any], path: Path) -> str:
    """The manifest's ``pixels`` (datasets written before it existed hold PNG)."""
    pixels = manifest.get("pixels", "png")
    if pixels not in PIXELS:
        raise DataError(f"{path}: field 'pixels': expected one of {', '.join(PIXELS)}, got {pixels!r}")
    return str(pixels)
