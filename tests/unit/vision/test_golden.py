"""Golden samples: the answer a model gives on a tile, and the comparison that admits bf16-sized
differences but refuses a density_scale error or a shifted segmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fieldkube.vision.golden import (
    COUNT_ABSOLUTE_TOLERANCE,
    COUNT_RELATIVE_TOLERANCE,
    FRACTION_ABSOLUTE_TOLERANCE,
    compare_answers,
    expected_answer,
    summarise_map,
)
from fieldkube.vision.models import build_model
from fieldkube.vision.normalize import batch_to_tensor


def test_summaries_of_count_and_probability_maps() -> None:
    density = np.full((1, 1, 8, 8), 0.125, dtype=np.float32)
    assert summarise_map("counter", density) == {"count": 8.0}
    probability = np.zeros((8, 8), dtype=np.float32)
    probability[:2] = 0.5  # exactly at the threshold: building
    probability[2:4] = 0.49
    assert summarise_map("segmenter", probability) == pytest.approx(
        {"mean_probability": (16 * 0.5 + 16 * 0.49) / 64, "building_fraction": 0.25}
    )
    with pytest.raises(ValueError, match="no golden answer for task 'custom'"):
        summarise_map("custom", probability)


def test_small_differences_pass() -> None:
    recorded = {"count": 6.2}
    assert compare_answers("counter", {"count": 6.2 * 1.02}, recorded) is None
    assert compare_answers("counter", {"count": 0.04}, {"count": 0.0}) is None  # near-empty tile: absolute
    segmenter = {"mean_probability": 0.41, "building_fraction": 0.38}
    shifted = {"mean_probability": 0.425, "building_fraction": 0.365}
    assert compare_answers("segmenter", shifted, segmenter) is None


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_a_count_off_by_a_density_scale_factor_of_two_is_refused(factor: float) -> None:
    problem = compare_answers("counter", {"count": 6.2 * factor}, {"count": 6.2})
    tolerance = COUNT_RELATIVE_TOLERANCE * 6.2 + COUNT_ABSOLUTE_TOLERANCE
    assert problem == f"count {6.2 * factor:.3f}, recorded at training 6.200 (tolerance ±{tolerance:.3f})"


def test_a_shifted_fraction_is_refused_and_named() -> None:
    recorded = {"mean_probability": 0.41, "building_fraction": 0.38}
    problem = compare_answers("segmenter", {"mean_probability": 0.41, "building_fraction": 0.45}, recorded)
    assert problem is not None
    assert problem.startswith("building_fraction 0.450, recorded at training 0.380")
    assert "mean_probability" not in problem
    both = compare_answers("segmenter", {"mean_probability": 0.2, "building_fraction": 0.1}, recorded)
    assert both is not None and "mean_probability 0.200" in both and "; building_fraction 0.100" in both
    assert FRACTION_ABSOLUTE_TOLERANCE < 0.07


def test_not_finite_or_missing_answers_never_match() -> None:
    assert compare_answers("counter", {"count": float("nan")}, {"count": 6.2}) is not None
    assert compare_answers("counter", {}, {"count": 6.2}) == "count missing, recorded at training 6.200"


def test_expected_answer_applies_the_activation_and_keeps_the_mode(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    counter = build_model("counter-mcnn", width=0.25).train()
    one = expected_answer(counter, "counter", image, density_scale=1.0)
    four = expected_answer(counter, "counter", image, density_scale=4.0)
    assert counter.training  # restored
    assert four["count"] == pytest.approx(one["count"] / 4, rel=1e-6)
    with torch.no_grad():
        raw = counter.eval()(batch_to_tensor(image[None]))
    assert one["count"] == pytest.approx(float(raw.double().sum()), rel=1e-5)

    segmenter = build_model("segmenter-unet", base_channels=4, depth=3)
    answer = expected_answer(segmenter, "segmenter", image)
    with torch.no_grad():
        probability = torch.sigmoid(segmenter.eval()(batch_to_tensor(image[None])))
    assert answer == pytest.approx(summarise_map("segmenter", probability.numpy()))
    assert 0.0 < answer["mean_probability"] < 1.0


def test_a_bf16_forward_pass_stays_within_the_count_tolerance(rng: np.random.Generator) -> None:
    """What a GPU in bf16 answers must pass against what the trainer recorded in fp32."""
    torch.manual_seed(2)  # initial weights that give a clearly positive count
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    model = build_model("counter-mcnn", width=0.25).eval()
    recorded = expected_answer(model, "counter", image, density_scale=2.0)
    assert recorded["count"] > 1.0  # a count a density_scale error would move visibly
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(batch_to_tensor(image[None])).float() / 2.0
    observed = summarise_map("counter", y.numpy())
    assert observed != recorded  # bf16 really answered differently
    assert compare_answers("counter", observed, recorded) is None
