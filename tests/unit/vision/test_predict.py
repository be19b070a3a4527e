"""Tiled prediction equals whole-image prediction: counts within 0.5 %, any image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fieldkube.vision.density import count_from_density
from fieldkube.vision.models import build_model
from fieldkube.vision.predict import predict_tiled, predict_whole


def local_density_model() -> nn.Module:
    """A small positive-output conv net: a real density regressor shape with a known receptive field."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 1, 5, padding=2), nn.Softplus()
    )


def test_tiled_count_matches_whole_image_count(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, size=(300, 420, 3), dtype=np.uint8)
    model = local_density_model().eval()
    whole = predict_whole(model, image)
    tiled = predict_tiled(model, image, tile=128, overlap=32, batch_size=4)
    assert tiled.shape == (300, 420)
    assert count_from_density(tiled) == pytest.approx(count_from_density(whole), rel=0.005)
    # Away from tile borders the maps agree pixel for pixel.
    np.testing.assert_allclose(tiled[40:90, 40:90], whole[40:90, 40:90], rtol=1e-4)


def test_mcnn_tiled_count_matches_whole_image_count(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = build_model("counter-mcnn", width=0.5).eval()
    image = rng.integers(0, 256, size=(260, 300, 3), dtype=np.uint8)
    whole = count_from_density(predict_whole(model, image))
    tiled = count_from_density(predict_tiled(model, image, tile=128, overlap=48, batch_size=8))
    assert tiled == pytest.approx(whole, rel=0.005)


def test_images_smaller_than_a_tile_are_padded_and_cropped(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    probability = predict_tiled(
        build_model("segmenter-unet", base_channels=4, depth=3).eval(), image, tile=64, activation="sigmoid"
    )
    assert probability.shape == (50, 70)
    assert ((probability > 0) & (probability < 1)).all()


def test_bad_batch_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        predict_tiled(local_density_model(), np.zeros((64, 64, 3), np.uint8), tile=32, batch_size=0)
