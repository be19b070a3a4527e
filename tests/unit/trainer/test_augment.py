"""Batch augmentation (fieldkube.trainer.augment) against the per-sample numpy definitions it replaces:
flips and turns move image, mask and density map together, a density map keeps its count, colour
jitter is the gray/saturation, contrast, brightness recipe, and a sample never depends on its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldkube.trainer.augment import (
    BRIGHTNESS,
    CONTRAST,
    HFLIP,
    SATURATION,
    TURNS,
    VFLIP,
    Augment,
    RawBatch,
    density_maps,
    draw_params,
    finish_batch,
    jitter_and_normalise_,
)
from fieldkube.vision.density import density_map_from_points
from fieldkube.vision.normalize import MEAN_RGB, STD_RGB, batch_to_tensor, to_tensor

TILE = 24
SIGMA = 2.0


def _numpy_turn(array: np.ndarray, params: np.ndarray) -> np.ndarray:
    if params[HFLIP]:
        array = array[:, ::-1]
    if params[VFLIP]:
        array = array[::-1]
    return np.ascontiguousarray(np.rot90(array, int(params[TURNS])))


def _sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, size=(TILE, TILE, 3), dtype=np.uint8)
    points = rng.uniform(0, TILE, size=(int(rng.integers(0, 6)), 2)).astype(np.float32)
    return image, points


def _raw(samples: list[tuple[np.ndarray, np.ndarray]], params: np.ndarray) -> RawBatch:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    rows = [np.column_stack([np.full(len(p), i, np.float32), p]) for i, (_, p) in enumerate(samples)]
    points = torch.from_numpy(np.concatenate(rows).astype(np.float32))
    return RawBatch.build(images, params.astype(np.float32), points, None)


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
@pytest.mark.parametrize("hflip", [0, 1])
@pytest.mark.parametrize("vflip", [0, 1])
def test_flips_and_turns_move_the_image_and_its_density_map_together(
    hflip: int, vflip: int, turns: int
) -> None:
    rng = np.random.default_rng([hflip, vflip, turns])
    samples = [_sample(rng) for _ in range(3)]
    params = np.tile(np.array([hflip, vflip, turns, 1, 1, 1], np.float32), (3, 1))
    inputs, targets = finish_batch(_raw(samples, params), "counter", SIGMA, density_scale=10.0)
    for i, (image, points) in enumerate(samples):
        expected_image = to_tensor(_numpy_turn(image, params[i]))
        torch.testing.assert_close(inputs[i], expected_image)
        stored = density_map_from_points(points, (TILE, TILE), sigma=SIGMA)
        expected = _numpy_turn(stored, params[i]) * 10.0
        np.testing.assert_allclose(targets[i, 0].numpy(), expected, atol=2e-6 * 10)
        assert float(targets[i].sum()) == pytest.approx(10.0 * len(points), rel=1e-5)


def test_segmenter_masks_turn_with_their_images() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(2, TILE, TILE, 3), dtype=np.uint8)
    masks = (images[..., 0] > 128).astype(np.uint8)
    params = np.array([[1, 0, 3, 1, 1, 1], [0, 1, 1, 1, 1, 1]], np.float32)
    raw = RawBatch.build(torch.from_numpy(images), params, torch.zeros((0, 3)), torch.from_numpy(masks))
    inputs, targets = finish_batch(raw, "segmenter", SIGMA, 1.0)
    for i in range(2):
        torch.testing.assert_close(inputs[i], to_tensor(_numpy_turn(images[i], params[i])))
        assert np.array_equal(targets[i, 0].numpy(), _numpy_turn(masks[i], params[i]).astype(np.float32))


def _floats(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) on the 0..255 scale, as finish_batch converts them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()


def test_colour_jitter_is_saturation_then_contrast_then_brightness() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    params = np.ones((4, 6), np.float32)
    params[:, 3:] = rng.uniform(0.7, 1.3, size=(4, 3))
    out = jitter_and_normalise_(_floats(images), torch.from_numpy(params))
    for i in range(4):
        pixels = images[i].astype(np.float64)
        gray = pixels.mean(axis=2, keepdims=True)
        pixels = gray + (pixels - gray) * params[i, SATURATION]
        pixels = (pixels - pixels.mean()) * params[i, CONTRAST] + pixels.mean()
        reference = np.clip(pixels * params[i, BRIGHTNESS], 0, 255)
        expected = (reference / 255.0 - np.array(MEAN_RGB)) / np.array(STD_RGB)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_unjittered_training_input_is_the_served_input_bit_for_bit() -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    params = np.ones((3, 6), np.float32)
    trained = jitter_and_normalise_(_floats(images), torch.from_numpy(params), jittered=False)
    assert torch.equal(trained, batch_to_tensor(images))


def test_a_sample_is_the_same_whatever_batch_or_rank_loads_it() -> None:
    augment = Augment(hflip=True, vflip=True, rot90=True, color_jitter=0.2)
    rng = np.random.default_rng(7)
    samples = [_sample(rng) for _ in range(6)]
    params = np.stack([draw_params(11, 2, i, augment, square=True) for i in range(6)])
    whole_inputs, whole_targets = finish_batch(_raw(samples, params), "counter", SIGMA, 100.0)
    for part in ([0, 1, 2], [3, 4, 5], [4]):
        inputs, targets = finish_batch(
            _raw([samples[i] for i in part], params[part]), "counter", SIGMA, 100.0
        )
        torch.testing.assert_close(inputs, whole_inputs[part], rtol=0, atol=0)
        torch.testing.assert_close(targets, whole_targets[part], rtol=0, atol=0)


def test_augmentation_draws_depend_on_seed_epoch_and_index_only() -> None:
    augment = Augment(hflip=True, vflip=True, rot90=True, color_jitter=0.2)
    draws = {tuple(draw_params(0, 1, i, augment, square=True)) for i in range(64)}
    assert len(draws) == 64  # jitter factors differ per sample
    np.testing.assert_array_equal(draw_params(0, 1, 5, augment, True), draw_params(0, 1, 5, augment, True))
    assert not np.array_equal(draw_params(0, 1, 5, augment, True), draw_params(0, 2, 5, augment, True))
    identity = [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(draw_params(0, -1, 5, augment, True), identity)  # validation
    np.testing.assert_array_equal(draw_params(0, 1, 5, None, True), identity)
    turns = {draw_params(0, 1, i, augment, square=False)[TURNS] for i in range(64)}
    assert turns == {0.0}  # a quarter turn would change a non-square tile's shape


def test_points_outside_the_tile_add_nothing_and_the_rest_keep_their_mass() -> None:
    points = torch.tensor([[0, 3.0, 4.0], [0, -1.0, 2.0], [1, 30.0, 1.0], [1, 23.999, 23.999]])
    maps = density_maps(points, 2, TILE, TILE, SIGMA, scale=2.0)
    assert maps.shape == (2, 1, TILE, TILE)
    assert float(maps[0].sum()) == pytest.approx(2.0, rel=1e-5)
    assert float(maps[1].sum()) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_a_point_on_the_tile_edge_stays_in_the_tile_when_mirrored(turns: int) -> None:
    """x = 0 mirrors to x = W, the first coordinate outside: the point must keep its mass."""
    image = np.zeros((TILE, TILE, 3), np.uint8)
    corner = np.array([[0.0, 0.0], [5.0, 0.0]], np.float32)
    params = np.array([[1, 1, turns, 1, 1, 1]], np.float32)
    _, targets = finish_batch(_raw([(image, corner)], params), "counter", SIGMA, 1.0)
    assert float(targets.sum()) == pytest.approx(2.0, rel=1e-5)
    peak = np.unravel_index(int(targets[0, 0].argmax()), (TILE, TILE))
    assert peak in {(TILE - 1, TILE - 1), (0, TILE - 1), (0, 0), (TILE - 1, 0)}  # a corner, turned
