"""The answers derived from a stitched map: count, grid sums and mask, on the host (numpy) and where a
device holds the map (torch). The device arithmetic runs here on CPU tensors: it must give what the
host's gives, since a GPU server answers with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldkube.serving.inference import (
    PixelMap,
    _cell_sums_on_device,
    _cell_sums_on_host,
    _mask_on_device,
    _mask_on_host,
    _total_on_device,
    _total_on_host,
)


@pytest.fixture
def values() -> np.ndarray:
    """A map whose sides are not multiples of the cell (partial last row and column of cells), cut out
    of a larger one as the service crops its padded maps (not contiguous)."""
    padded = np.random.default_rng(0).random((150, 210)).astype(np.float32)
    return padded[:130, :190]


def test_the_count_is_the_float64_sum_on_host_and_device(values: np.ndarray) -> None:
    expected = float(np.sum(values.astype(np.float64)))
    assert _total_on_host(values) == pytest.approx(expected, rel=1e-12)
    assert _total_on_device(torch.from_numpy(values)) == pytest.approx(expected, rel=1e-12)
    assert PixelMap(torch.from_numpy(values)).total() == pytest.approx(expected, rel=1e-12)


def test_grid_cells_sum_their_own_pixels_on_host_and_device(values: np.ndarray) -> None:
    expected = np.array(
        [
            [values[y : y + 64, x : x + 64].astype(np.float64).sum() for x in range(0, 190, 64)]
            for y in (0, 64, 128)
        ]
    )
    np.testing.assert_allclose(_cell_sums_on_host(values, 64), expected, rtol=1e-12)
    np.testing.assert_allclose(_cell_sums_on_device(torch.from_numpy(values), 64), expected, rtol=1e-12)
    cells = PixelMap(torch.from_numpy(values)).grid_counts(64)
    assert [(c.row, c.col) for c in cells] == [(r, c) for r in range(3) for c in range(3)]
    assert cells[-1].box == (128, 128, 130, 190)  # the partial corner cell
    assert [c.count for c in cells] == pytest.approx(expected.ravel().tolist(), rel=1e-12)
    assert sum(c.count for c in cells) == pytest.approx(float(values.astype(np.float64).sum()), rel=1e-12)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.999, 1.0])
def test_masks_mark_the_pixels_at_or_above_the_threshold_on_host_and_device(
    values: np.ndarray, threshold: float
) -> None:
    expected = (values >= threshold).astype(np.uint8)
    for building, pixels in (
        _mask_on_host(values, threshold),
        _mask_on_device(torch.from_numpy(values), threshold),
        PixelMap(torch.from_numpy(values)).mask(threshold),
    ):
        assert building.dtype == np.uint8 and building.shape == (130, 190)
        np.testing.assert_array_equal(building, expected)
        assert pixels == int(expected.sum())


def test_the_host_map_is_the_tensors_memory_on_a_cpu(values: np.ndarray) -> None:
    tensor = torch.from_numpy(values)
    stitched = PixelMap(tensor)
    assert not stitched.on_device and stitched.shape == (130, 190)
    assert np.shares_memory(stitched.host(), values)
    assert stitched.host() is stitched.host()
