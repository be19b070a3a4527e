"""The batch loader over prepared shards: PNG and raw pixel storage give the same batches, a batch is the
same whichever keys it is read with, and a corrupt raw tile is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fieldkube.contract.config import DataConfig
from fieldkube.trainer.dataset_format import read_manifest
from fieldkube.trainer.errors import DataError
from fieldkube.trainer.loader import BatchPlan, PreparedDataset, make_loader
from fieldkube.trainer.prepare import run

COUNTER = [
    "--synthetic",
    "field",
    "--num-images",
    "4",
    "--image-size",
    "64x96",
    "--tile",
    "32",
    "--seed",
    "3",
]
SEGMENTER = ["--synthetic", "aerial", "--num-images", "3", "--image-size", "80x80", "--tile", "32"]


@pytest.fixture(scope="module", params=["counter", "segmenter"])
def both_storages(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    source = COUNTER if request.param == "counter" else SEGMENTER
    roots = []
    for pixels in ("png", "raw"):
        root = tmp_path_factory.mktemp(f"{request.param}-{pixels}")
        assert run([*source, "--workers", "1", "--no-balance", "--pixels", pixels, "--out", str(root)]) == 0
        roots.append(root)
    return roots[0], roots[1]


def test_raw_pixels_give_the_batches_png_gives_without_decoding(both_storages: tuple[Path, Path]) -> None:
    png_root, raw_root = both_storages
    assert read_manifest(png_root).get("pixels") == "png" and read_manifest(raw_root)["pixels"] == "raw"
    data = DataConfig(color_jitter=0.2)
    png = PreparedDataset(png_root, "train", data, seed=1, augment=True)
    raw = PreparedDataset(raw_root, "train", data, seed=1, augment=True)
    assert len(png) == len(raw) > 4
    keys = [(2, i) for i in range(len(png))][::-1]
    for got, expected in zip(raw.batch(keys), png.batch(keys), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for index in (0, len(png) - 1):
        for got_array, expected_array in zip(raw.raw(index)[:2], png.raw(index)[:2], strict=True):
            np.testing.assert_array_equal(got_array, expected_array)
    shards = [raw_root / f for f in read_manifest(raw_root)["splits"]["train"]["files"]]
    first = pq.read_table(shards).column("image")[0].as_py()
    assert len(first) == 32 * 32 * 3  # stored as uint8, not PNG


def test_a_batch_is_the_same_read_whole_or_in_parts_and_by_the_loader(
    both_storages: tuple[Path, Path],
) -> None:
    dataset = PreparedDataset(both_storages[0], "train", DataConfig(color_jitter=0.2), seed=4, augment=True)
    keys = [(0, i) for i in range(min(6, len(dataset)))]
    inputs, targets = dataset.batch(keys)
    for i, key in enumerate(keys):
        one_input, one_target = dataset[key]
        torch.testing.assert_close(one_input, inputs[i], rtol=0, atol=0)
        torch.testing.assert_close(one_target, targets[i], rtol=0, atol=0)
    plan = BatchPlan(len(dataset), 2, rank=0, world=1, seed=4, epochs=2, total_steps=3)
    loaded = list(make_loader(dataset, plan, workers=1, prefetch=2))
    assert len(loaded) == 3
    for (got_inputs, got_targets, loader_cpu_s), keys in zip(loaded, plan, strict=True):
        assert loader_cpu_s > 0  # the worker's CPU time on this batch, which the trainer reports
        expected_inputs, expected_targets = dataset.batch(keys)
        torch.testing.assert_close(got_inputs, expected_inputs, rtol=0, atol=0)
        torch.testing.assert_close(got_targets, expected_targets, rtol=0, atol=0)


def test_a_raw_tile_of_the_wrong_size_is_one_clear_error(tmp_path: Path) -> None:
    assert run([*COUNTER, "--workers", "1", "--no-balance", "--pixels", "raw", "--out", str(tmp_path)]) == 0
    shards = [tmp_path / f for f in read_manifest(tmp_path)["splits"]["train"]["files"]]
    shard = next(s for s in shards if pq.read_metadata(s).num_rows)
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[0] = images[0][:-3]
    pq.write_table(
        table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), shard
    )
    dataset = PreparedDataset(tmp_path, "train", DataConfig(), seed=0, augment=False)
    with pytest.raises(DataError, match=r"raw tile holds 3069 bytes, expected 3072 for 32x32x3 uint8"):
        dataset.batch([(-1, i) for i in range(len(dataset))])
