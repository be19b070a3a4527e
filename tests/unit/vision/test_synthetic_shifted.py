"""The shifted-domain field: seeded, exact points, and different on purpose from the first field (flower
colour and size, no yellow flowers, another ground and light)."""

from __future__ import annotations

import numpy as np
import pytest

from fieldkube.vision.synthetic import make_field_image, make_shifted_field_image


def test_shifted_images_are_reproducible_from_the_seed() -> None:
    a = make_shifted_field_image(np.random.default_rng(9), 96, 128, 15)
    b = make_shifted_field_image(np.random.default_rng(9), 96, 128, 15)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.points, b.points)
    assert not np.array_equal(a.image, make_shifted_field_image(np.random.default_rng(10), 96, 128, 15).image)


def test_shifted_sample_has_exact_points_inside_the_image() -> None:
    sample = make_shifted_field_image(np.random.default_rng(1), 100, 130, 37)
    assert sample.image.shape == (100, 130, 3) and sample.image.dtype == np.uint8
    assert sample.points.shape == (37, 2) and sample.points.dtype == np.float32
    assert (
        (sample.points >= 0).all() and (sample.points[:, 0] < 130).all() and (sample.points[:, 1] < 100).all()
    )
    assert sample.hazards == ()


def _petal_pixels(image: np.ndarray, points: np.ndarray, offset: float) -> np.ndarray:
    cols = np.clip((points[:, 0] + offset).astype(int), 0, image.shape[1] - 1)
    rows = points[:, 1].astype(int)
    return image[rows, cols].astype(int)


def test_shifted_flowers_are_larger_and_blue_where_the_first_fields_are_yellow() -> None:
    shifted = make_shifted_field_image(np.random.default_rng(2), 200, 200, 12)
    first = make_field_image(np.random.default_rng(2), 200, 200, 12, hazards=())
    petals = _petal_pixels(shifted.image, shifted.points, 3.0)
    assert (petals[:, 2] > petals[:, 0] + 10).mean() >= 0.75  # blue-violet petals 3 px from the centre
    beyond = _petal_pixels(first.image, first.points, 3.0)
    assert (beyond[:, 2] > beyond[:, 0] + 10).mean() <= 0.2  # yellow flowers (and leaves) are not
    background = (
        make_shifted_field_image(np.random.default_rng(3), 200, 200, 0).image.reshape(-1, 3).astype(int)
    )
    assert ((background[:, 0] > 170) & (background[:, 2] < 110)).mean() < 0.01  # nothing yellow to count


@pytest.mark.parametrize(("size", "flowers"), [((4, 64), 1), ((64, 64), -1)])
def test_shifted_generator_rejects_bad_arguments(size: tuple[int, int], flowers: int) -> None:
    with pytest.raises(ValueError):
        make_shifted_field_image(np.random.default_rng(0), *size, flowers)
