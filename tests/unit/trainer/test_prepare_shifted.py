"""fieldkube-prepare --synthetic field-shifted: a counter dataset of the other field, with exact counts, whose
first N images are the same for every N (so the domain-shift benchmark's 4, 8, 16, 32 are nested)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fieldkube.trainer.dataset_format import read_manifest
from fieldkube.trainer.prepare import run

SHIFTED = [
    "--synthetic",
    "field-shifted",
    "--image-size",
    "64x96",
    "--tile",
    "32",
    "--seed",
    "5",
    "--no-balance",
]


def _records(root: Path) -> list[dict]:
    manifest = read_manifest(root)
    files = [root / f for split in manifest["splits"].values() for f in split["files"]]
    return sorted(pq.read_table(files).to_pylist(), key=lambda r: r["id"])


def test_shifted_field_dataset_has_tiles_with_exact_counts(tmp_path: Path) -> None:
    assert run([*SHIFTED, "--num-images", "4", "--workers", "1", "--out", str(tmp_path)]) == 0
    manifest = read_manifest(tmp_path)
    assert manifest["task"] == "counter" and manifest["tile"] == 32
    records = _records(tmp_path)
    assert len(records) == 4 * 2 * 3
    for record in records:
        assert record["count"] == len(np.asarray(record["points"] or []).reshape(-1, 2))
        assert record["id"].startswith("shifted")


def test_fewer_shifted_images_are_a_prefix_of_more(tmp_path: Path) -> None:
    run([*SHIFTED, "--num-images", "2", "--workers", "1", "--out", str(tmp_path / "two")])
    run([*SHIFTED, "--num-images", "4", "--workers", "1", "--out", str(tmp_path / "four")])
    two = {r["id"]: r["count"] for r in _records(tmp_path / "two")}
    four = {r["id"]: r["count"] for r in _records(tmp_path / "four")}
    assert two and all(four[key] == count for key, count in two.items())
