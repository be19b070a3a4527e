"""Synthetic generators: seeded, exact ground truth, hazards that look like what they claim to be."""

from __future__ import annotations

import numpy as np
import pytest

from fieldkube.vision.synthetic import HAZARDS, make_aerial_scene, make_field_image


def near_white_fraction(image: np.ndarray) -> float:
    return float((image.min(axis=2) > 150).mean())


def test_field_images_are_reproducible_from_the_seed() -> None:
    a = make_field_image(np.random.default_rng(9), 96, 128, 15)
    b = make_field_image(np.random.default_rng(9), 96, 128, 15)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.points, b.points)
    c = make_field_image(np.random.default_rng(10), 96, 128, 15)
    assert not np.array_equal(a.image, c.image)


def test_field_sample_has_exact_points_inside_the_image() -> None:
    sample = make_field_image(np.random.default_rng(1), 100, 130, 37)
    assert sample.image.shape == (100, 130, 3) and sample.image.dtype == np.uint8
    assert sample.points.shape == (37, 2) and sample.points.dtype == np.float32
    assert (sample.points[:, 0] >= 0).all() and (sample.points[:, 0] < 130).all()
    assert (sample.points[:, 1] >= 0).all() and (sample.points[:, 1] < 100).all()
    assert sample.hazards == HAZARDS


def test_flowers_are_yellow_at_their_points() -> None:
    sample = make_field_image(np.random.default_rng(2), 160, 160, 40, hazards=())
    cols = sample.points[:, 0].astype(int)
    rows = sample.points[:, 1].astype(int)
    r, g, b = (sample.image[rows, cols].astype(int)[:, c] for c in range(3))
    yellow = (r > 170) & (g > 110) & (b < 110)
    assert yellow.mean() >= 0.9
    everywhere = sample.image.reshape(-1, 3).astype(int)
    assert ((everywhere[:, 0] > 170) & (everywhere[:, 2] < 110)).mean() < 0.1


def test_zero_flowers_gives_no_yellow() -> None:
    sample = make_field_image(np.random.default_rng(3), 96, 96, 0, hazards=())
    assert sample.points.shape == (0, 2)
    pixels = sample.image.reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] > 150) & (pixels[:, 2] < 90)).sum() == 0


@pytest.mark.parametrize("hazard", ["glare", "dust"])
def test_glare_and_dust_add_bright_flower_sized_distractors(hazard: str) -> None:
    with_hazard = [
        make_field_image(np.random.default_rng(s), 128, 128, 5, hazards=(hazard,)) for s in range(4)
    ]
    clean = [make_field_image(np.random.default_rng(s), 128, 128, 5, hazards=()) for s in range(4)]
    assert all(s.hazards == (hazard,) for s in with_hazard)
    assert np.mean([near_white_fraction(s.image) for s in with_hazard]) > 0.002
    assert np.mean([near_white_fraction(s.image) for s in clean]) < 0.0005


def test_shadow_darkens_the_scene() -> None:
    shaded = [make_field_image(np.random.default_rng(s), 128, 128, 5, hazards=("shadow",)) for s in range(4)]
    clean = [make_field_image(np.random.default_rng(s), 128, 128, 5, hazards=()) for s in range(4)]
    darkest = [np.percentile(s.image.mean(axis=2), 10) for s in shaded]
    reference = [np.percentile(s.image.mean(axis=2), 10) for s in clean]
    assert np.mean(darkest) < 0.85 * np.mean(reference)


def test_bad_field_arguments_are_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"unknown hazard.*fog"):
        make_field_image(rng, 64, 64, 3, hazards=("fog",))
    with pytest.raises(ValueError, match="n_flowers"):
        make_field_image(rng, 64, 64, -1)


def test_aerial_scenes_have_exact_binary_masks() -> None:
    fractions = []
    for seed in range(6):
        sample = make_aerial_scene(np.random.default_rng(seed), 128, 160)
        assert sample.image.shape == (128, 160, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (128, 160) and sample.mask.dtype == np.uint8
        assert set(np.unique(sample.mask)) <= {0, 1}
        fractions.append(sample.mask.mean())
    assert 0.02 < np.mean(fractions) < 0.6


def test_aerial_roofs_differ_from_the_ground_around_them() -> None:
    sample = make_aerial_scene(np.random.default_rng(4), 224, 224)
    roof = sample.image[sample.mask == 1].astype(float)
    ground = sample.image[sample.mask == 0].astype(float)
    # Roofs are flat-coloured: much less texture than their surroundings on average per channel.
    assert roof.size and ground.size
    assert np.abs(roof.mean(axis=0) - ground.mean(axis=0)).max() > 10


def test_aerial_scenes_are_reproducible_from_the_seed() -> None:
    a = make_aerial_scene(np.random.default_rng(5), 64, 64)
    b = make_aerial_scene(np.random.default_rng(5), 64, 64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_gallery_pictures_are_written(tmp_path) -> None:
    from fieldkube.vision.imageio import read_image
    from fieldkube.vision.synthetic.gallery import main

    main([str(tmp_path), "--seed", "1"])
    assert read_image(tmp_path / "synthetic-field.png").shape == (2 * 224 + 4, 3 * 224 + 8, 3)
    assert read_image(tmp_path / "synthetic-aerial.png").shape == (2 * 256 + 4, 2 * 256 + 4, 3)
