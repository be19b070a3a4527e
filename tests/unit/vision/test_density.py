"""Density maps from points keep the count exactly, at the border too."""

from __future__ import annotations

import numpy as np
import pytest

from fieldkube.vision.density import count_from_density, density_map_from_points


def test_density_sums_to_the_number_of_points(rng: np.random.Generator) -> None:
    points = rng.uniform([0, 0], [130, 100], size=(57, 2))
    density = density_map_from_points(points, (100, 130), sigma=4.0)
    assert density.dtype == np.float32
    assert density.shape == (100, 130)
    assert count_from_density(density) == pytest.approx(57, rel=1e-5)


@pytest.mark.parametrize("sigma", [0.0, 1.0, 3.0, 15.0])
def test_points_at_the_border_and_corners_keep_unit_mass(sigma: float) -> None:
    points = np.array([[0.0, 0.0], [63.9, 0.2], [0.1, 47.9], [63.5, 47.5], [31.0, 0.0]])
    density = density_map_from_points(points, (48, 64), sigma=sigma)
    assert count_from_density(density) == pytest.approx(5.0, rel=1e-5)
    assert (density >= 0).all()


def test_points_outside_the_image_are_ignored() -> None:
    points = np.array([[10.0, 10.0], [-1.0, 5.0], [5.0, 48.0], [64.0, 3.0], [np.nan, 2.0]])
    density = density_map_from_points(points, (48, 64), sigma=2.0)
    assert count_from_density(density) == pytest.approx(1.0, rel=1e-6)


def test_mass_is_centred_on_the_point() -> None:
    density = density_map_from_points(np.array([[20.5, 10.5]]), (32, 40), sigma=2.0)
    row, col = np.unravel_index(np.argmax(density), density.shape)
    assert (row, col) == (10, 20)
    ys, xs = np.mgrid[0:32, 0:40]
    assert float((density * (xs + 0.5)).sum()) == pytest.approx(20.5, abs=1e-3)
    assert float((density * (ys + 0.5)).sum()) == pytest.approx(10.5, abs=1e-3)


def test_no_points_gives_an_empty_map() -> None:
    density = density_map_from_points(np.zeros((0, 2)), (8, 8))
    assert count_from_density(density) == 0.0


def test_invalid_sigma_is_rejected() -> None:
    with pytest.raises(ValueError, match="sigma"):
        density_map_from_points(np.zeros((1, 2)), (8, 8), sigma=-1)
