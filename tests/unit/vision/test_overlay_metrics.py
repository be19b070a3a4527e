"""Overlays keep the picture where there is nothing to show; metrics match hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fieldkube.vision.metrics import count_bin, counting_metrics, segmentation_metrics
from fieldkube.vision.overlay import density_overlay, mask_overlay, points_overlay


def test_density_overlay_colours_only_where_density_is_positive() -> None:
    image = np.full((20, 30, 3), 90, np.uint8)
    density = np.zeros((20, 30), np.float32)
    density[5:8, 10:13] = 1.0
    out = density_overlay(image, density)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[0, 0] == 90).all()
    assert not (out[6, 11] == 90).all()
    with pytest.raises(ValueError, match="does not match"):
        density_overlay(image, density[:10])


def test_mask_overlay_tints_the_mask_and_points_overlay_draws_crosses() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    out = mask_overlay(image, mask)
    assert out[10, 10, 0] > 100 and out[0, 0].sum() == 0
    crosses = points_overlay(image, np.array([[10.2, 4.7]]))
    assert (crosses[4, 10] == (255, 0, 255)).all() and (crosses[4, 8] == (255, 0, 255)).all()


def test_count_bins_follow_seed_000() -> None:
    assert [count_bin(c) for c in (0, 1, 2, 3, 4, 5, 7, 8, 40)] == [
        "0",
        "1",
        "2",
        "3-4",
        "3-4",
        "5-7",
        "5-7",
        ">=8",
        ">=8",
    ]


def test_counting_metrics_by_hand() -> None:
    true = [0, 1, 4, 10]
    pred = [1, 1, 2, 13]
    metrics = counting_metrics(true, pred)
    assert metrics["mae"] == pytest.approx((1 + 0 + 2 + 3) / 4)
    assert metrics["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4 + 9) / 4))
    assert metrics["mre"] == pytest.approx((0 + 0.5 + 0.3) / 3)  # zero-count tile excluded
    assert metrics["r2"] == pytest.approx(1 - 14 / np.sum((np.array(true) - 3.75) ** 2))
    assert metrics["by_bin"]["3-4"] == {"n": 1, "mae": 2.0, "rmse": 2.0, "mre": 0.5}
    assert metrics["by_bin"]["0"]["n"] == 1 and math.isnan(metrics["by_bin"]["0"]["mre"])
    assert metrics["by_bin"]["5-7"]["n"] == 0


def test_segmentation_metrics_by_hand() -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 255  # 4 pixels
    pred = np.zeros((2, 4, 4), np.float32)
    pred[0, :2, :3] = 0.9  # 6 predicted, 4 correct
    metrics = segmentation_metrics(pred, truth)
    assert metrics["iou"] == pytest.approx(4 / 6)
    assert metrics["mean_iou"] == pytest.approx((4 / 6 + 1.0) / 2)  # empty-vs-empty image counts as 1
    assert metrics["pixel_accuracy"] == pytest.approx(30 / 32)
    assert metrics["f1"] == pytest.approx(8 / 10)
    assert metrics["precision"] == pytest.approx(4 / 6) and metrics["recall"] == 1.0


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 true counts but 2"):
        counting_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="does not match"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
