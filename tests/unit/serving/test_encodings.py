"""Response encodings keep what they encode: RLE masks, sum-pooled density arrays, heat maps."""

from __future__ import annotations

import numpy as np
import pytest

from fieldkube.serving.encodings import (
    decode_array,
    encode_array,
    heatmap,
    mask_to_coco_rle,
    mask_to_rle,
    rle_to_mask,
    sum_pool,
)


@pytest.mark.parametrize("first", [0, 1])
def test_rle_round_trips_and_starts_with_a_zero_run(first: int) -> None:
    rng = np.random.default_rng(first)
    mask = (rng.random((13, 17)) > 0.6).astype(np.uint8)
    mask[0, 0] = first
    rle = mask_to_rle(mask)
    assert (rle["counts"][0] == 0) == (first == 1)
    assert sum(rle["counts"]) == mask.size
    np.testing.assert_array_equal(rle_to_mask(rle), mask)


def test_coco_rle_is_column_major_and_pycocotools_decodes_it() -> None:
    from pycocotools import mask as coco_mask

    mask = np.zeros((5, 7), dtype=np.uint8)
    mask[0, :] = 1  # one row: a single run row-major, seven runs column-major
    rle = mask_to_coco_rle(mask)
    assert rle["size"] == [5, 7]
    assert isinstance(rle["counts"], str)
    np.testing.assert_array_equal(coco_mask.decode(rle), mask)
    uncompressed = coco_mask.frPyObjects({"size": [5, 7], "counts": [0] + [1, 4] * 7}, 5, 7)
    assert coco_mask.decode(uncompressed).tolist() == mask.tolist()
    assert rle["counts"] == uncompressed["counts"].decode("ascii")


def test_sum_pool_keeps_the_total_count_with_partial_edge_blocks() -> None:
    density = np.random.default_rng(0).random((37, 50)).astype(np.float32)
    pooled = sum_pool(density, 8)
    assert pooled.shape == (5, 7)
    assert pooled.sum() == pytest.approx(density.sum(), rel=1e-5)


def test_density_array_round_trips_in_float16() -> None:
    density = np.random.default_rng(1).random((9, 11)).astype(np.float32)
    decoded = decode_array(encode_array(density))
    np.testing.assert_allclose(decoded, density, atol=1e-3)


def test_heatmap_is_rgb_and_brightest_at_the_maximum() -> None:
    values = np.zeros((4, 4), dtype=np.float32)
    values[2, 3] = 5.0
    rgb = heatmap(values)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert rgb[2, 3].sum() > rgb[0, 0].sum()
    assert heatmap(np.zeros((2, 2), dtype=np.float32)).max() == 0
