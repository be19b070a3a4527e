"""The shared normalisation: batches come out channels_last with the values of the per-channel
arithmetic over planar channels, bit for bit, so training and serving still see identical tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldkube.vision.normalize import (
    MEAN_RGB,
    STD_RGB,
    batch_to_tensor,
    normalize_batch,
    standardise_,
    to_tensor,
)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 32, 48), (3, 233, 256)])  # last: many CPU blocks
def test_a_batch_is_channels_last_and_equals_the_planar_arithmetic_bit_for_bit(shape) -> None:
    images = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    planar = standardise_(torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous())

    batch = batch_to_tensor(images)

    assert batch.shape == planar.shape and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, planar)
    for i in range(shape[0]):  # one image alone: the same tensor as in its batch
        assert torch.equal(to_tensor(images[i]), batch[i])


def test_a_non_contiguous_uint8_view_is_read_as_its_values() -> None:
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    strided = torch.from_numpy(images)[::2, :, ::2]  # every other image and column
    assert torch.equal(normalize_batch(strided), batch_to_tensor(np.ascontiguousarray(images[::2, :, ::2])))


def test_a_wrong_dtype_or_shape_is_refused_with_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"expected a uint8 tensor \(N, H, W, 3\)"):
        normalize_batch(torch.zeros((1, 3, 8, 8), dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected a uint8 tensor"):
        normalize_batch(torch.zeros((1, 8, 8, 3)))


def test_the_arithmetic_is_one_scale_and_one_shift_per_channel_in_float32() -> None:
    pixels = torch.arange(256, dtype=torch.float32).repeat(3, 1).view(1, 3, 16, 16)
    std, mean = torch.tensor(STD_RGB).view(3, 1, 1), torch.tensor(MEAN_RGB).view(3, 1, 1)
    expected = pixels * (1 / (255.0 * std)) - mean / std
    assert torch.equal(standardise_(pixels.clone()), expected)
