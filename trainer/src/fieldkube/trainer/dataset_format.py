"""The prepared dataset on disk: Parquet shards per split plus manifest.json, shared by prepare and loader.

Layout of a prepared dataset directory::

    manifest.json                 task, tile, splits -> shard files, row counts, train selection
    shards/<split>-<k:05d>.parquet   one file per split per shard k (written by one worker / Job index)
    shards/shard-<k:05d>.json        completion marker of shard k (row counts, plan fingerprint)

Row columns: id, source, split, tile_row, tile_col, y0, x0, height, width, image (PNG bytes), count
(counter: points in the tile; segmenter: building pixel fraction), bin (seed-000 count bin), points
(flattened x, y pairs in tile pixels, counter), mask (PNG bytes, segmenter), tags (e.g. "glare,dust").
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from fieldkube.trainer.errors import DataError
from fieldkube.vision.metrics import COUNT_BINS, count_bin

__all__ = ["COUNT_BINS", "count_bin"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


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
