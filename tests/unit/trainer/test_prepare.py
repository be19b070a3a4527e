"""fieldkube-prepare: tiles carry exact targets, splits are seeded, bins are balanced, Job indices agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fieldkube.trainer.dataset_format import read_manifest
from fieldkube.trainer.errors import DataError
from fieldkube.trainer.prepare import parse_split, run

FIELD = ["--synthetic", "field", "--num-images", "6", "--image-size", "64x96", "--tile", "32", "--seed", "3"]


def _table(root: Path, split: str):
    manifest = read_manifest(root)
    return pq.read_table([root / f for f in manifest["splits"][split]["files"]])


def test_synthetic_field_dataset_has_tiles_with_exact_counts(tmp_path: Path) -> None:
    assert run([*FIELD, "--workers", "2", "--no-balance", "--out", str(tmp_path)]) == 0
    manifest = read_manifest(tmp_path)
    assert manifest["task"] == "counter" and manifest["tile"] == 32
    rows = sum(manifest["splits"][s]["rows"] for s in ("train", "test"))
    assert rows == 6 * 2 * 3  # ROI 64x96 -> a 2x3 grid of 32-pixel tiles per image
    table = _table(tmp_path, "train")
    for record in table.slice(0, 5).to_pylist():
        points = np.asarray(record["points"]).reshape(-1, 2)
        assert record["count"] == len(points)
        assert ((points >= 0) & (points < 32)).all()
        assert record["image"][:8] == b"\x89PNG\r\n\x1a\n"
    # split by image: all tiles of one image land in the same split
    sources = {
        split: set(_table(tmp_path, split).column("source").to_pylist()) for split in ("train", "test")
    }
    assert not sources["train"] & sources["test"]


def test_indexed_job_shards_then_finalize_equal_the_local_pool(tmp_path: Path) -> None:
    local, indexed = tmp_path / "local", tmp_path / "indexed"
    run([*FIELD, "--shards", "3", "--workers", "1", "--out", str(local)])
    for index in range(3):
        run([*FIELD, "--shards", "3", "--shard-index", str(index), "--out", str(indexed)])
    run([*FIELD, "--shards", "3", "--finalize", "--out", str(indexed)])
    a, b = read_manifest(local), read_manifest(indexed)
    assert a["fingerprint"] == b["fingerprint"]
    assert a["splits"]["train"]["selection"] == b["splits"]["train"]["selection"]
    assert _table(local, "test").column("id").to_pylist() == _table(indexed, "test").column("id").to_pylist()


def test_balancing_equalises_the_seed_bins_of_the_train_split(tmp_path: Path) -> None:
    run([*FIELD, "--workers", "1", "--out", str(tmp_path)])
    manifest = read_manifest(tmp_path)
    balancing = manifest["balancing"]
    keep = balancing["per_bin_after"]
    non_empty = [n for n in balancing["bins_before"].values() if n]
    assert keep == min(non_empty)
    assert manifest["splits"]["train"]["selected_rows"] == keep * len(non_empty)


def test_finalize_refuses_a_missing_shard(tmp_path: Path) -> None:
    run([*FIELD, "--shards", "2", "--shard-index", "0", "--out", str(tmp_path)])
    with pytest.raises(DataError, match="shard 1 has not finished"):
        run([*FIELD, "--shards", "2", "--finalize", "--out", str(tmp_path)])


def test_split_specifications() -> None:
    assert parse_split("70/30") == (("train", 0.7), ("test", 0.3))
    assert [n for n, _ in parse_split("60/20/20")] == ["train", "val", "test"]
    with pytest.raises(DataError, match="--split '70-30'"):
        parse_split("70-30")


def test_synthetic_aerial_dataset_has_masks(tmp_path: Path) -> None:
    args = ["--synthetic", "aerial", "--num-images", "3", "--image-size", "80x80", "--tile", "32"]
    run([*args, "--workers", "1", "--out", str(tmp_path)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["task"] == "segmenter" and set(manifest["splits"]) == {"train", "val", "test"}
    total = sum(s["rows"] for s in manifest["splits"].values())
    assert total == 3 * 9  # 80 px with 32-pixel tiles: 3 per side, the last shifted back inside
    record = _table(tmp_path, "train").slice(0, 1).to_pylist()[0]
    assert record["mask"][:4] == b"\x89PNG" and 0.0 <= record["count"] <= 1.0
