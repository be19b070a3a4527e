"""The classical baseline counts clean flowers well and is fooled by glare and dust, as in seed 000."""

from __future__ import annotations

import numpy as np
import pytest

from fieldkube.vision.classical import count_classical, detect_flowers
from fieldkube.vision.synthetic import make_field_image


def mean_abs_error(hazards: tuple[str, ...]) -> float:
    errors = []
    for seed in range(4):
        rng = np.random.default_rng(500 + seed)
        n = int(rng.integers(3, 12))
        sample = make_field_image(rng, 160, 160, n, hazards=hazards)
        errors.append(abs(count_classical(sample.image) - n))
    return float(np.mean(errors))


def test_classical_counter_is_accurate_on_clean_images() -> None:
    assert mean_abs_error(()) <= 1.5


def test_detected_blobs_sit_on_flowers() -> None:
    sample = make_field_image(np.random.default_rng(8), 128, 128, 6, hazards=())
    found = detect_flowers(sample.image)
    distances = np.linalg.norm(found[:, None, :] - sample.points[None, :, :], axis=2).min(axis=1)
    assert len(found) >= 4 and np.median(distances) < 3.0


@pytest.mark.parametrize("hazard", ["glare", "dust"])
def test_glare_and_dust_fool_the_classical_counter(hazard: str) -> None:
    assert mean_abs_error((hazard,)) > 3 * max(mean_abs_error(()), 1.0)


def test_classical_counter_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        count_classical(np.zeros((10, 10), np.uint8))
