"""Evaluation metrics of the seeds: counting errors overall and per count bin, and segmentation scores.

Counting (seed 000): MAE, RMSE, mean relative error over tiles whose true count is non-zero, R², overall
and per true-count bin 0, 1, 2, 3-4, 5-7, >=8. Segmentation (seed 004): pixel accuracy, IoU (global,
from summed confusion counts, and the per-image mean), F1, precision, recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

COUNT_BINS: tuple[tuple[str, float, float], ...] = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-4", 3, 4),
    ("5-7", 5, 7),
    (">=8", 8, math.inf),
)


def count_bin(true_count: float) -> str:
    """The seed-000 bin label of a true count (rounded to the nearest integer)."""
    value = round(true_count)
    for label, low, high in COUNT_BINS:
        if low <= value <= high:
            return label
    raise ValueError(f"count must be >= 0, got {true_count}")


def _errors(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if true.size == 0:
        return {"n": 0, "mae": math.nan, "rmse": math.nan, "mre": math.nan}
    error = pred - true
    nonzero = true > 0
    mre = float(np.mean(np.abs(error[nonzero]) / true[nonzero])) if nonzero.any() else math.nan
    return {
        "n": int(true.size),
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mre": mre,
    }


def counting_metrics(true_counts: npt.ArrayLike, predicted_counts: npt.ArrayLike) -> dict[str, Any]:
    """{"n", "mae", "rmse", "mre", "r2", "by_bin": {label: {"n", "mae", "rmse", "mre"}}}; NaN if undefined."""
    true = np.asarray(true_counts, dtype=np.float64).ravel()
    pred = np.asarray(predicted_counts, dtype=np.float64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"got {true.size} true counts but {pred.size} predictions")
    result: dict[str, Any] = _errors(true, pred)
    variance = float(np.sum((true - true.mean()) ** 2)) if true.size else 0.0
    result["r2"] = 1.0 - float(np.sum((pred - true) ** 2)) / variance if variance > 0 else math.nan
    labels = np.array([count_bin(t) for t in true])
    result["by_bin"] = {
        label: _errors(true[labels == label], pred[labels == label]) for label, _, _ in COUNT_BINS
    }
    return result


@dataclass
class SegmentationMeter:
    """Streaming segmentation scores: feed (prediction, truth) mask pairs, read `result()` at the end."""

    threshold: float = 0.5
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    image_ious: list[float] = field(default_factory=list)

    def update(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: `predicted` probabilities or {0,1} mask (H, W), `truth` {0,1} or {0,255} (H, W)."""
        if predicted.shape != truth.shape:
            raise ValueError(f"prediction shape {predicted.shape} does not match truth {truth.shape}")
        pred = np.asarray(predicted) >= self.threshold
        true = np.asarray(truth) > 0
        tp = int(np.count_nonzero(pred & true))
        fp = int(np.count_nonzero(pred & ~true))
        fn = int(np.count_nonzero(~pred & true))
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        self.tn += int(pred.size) - tp - fp - fn
        union = tp + fp + fn
        self.image_ious.append(tp / union if union else 1.0)

    def result(self) -> dict[str, float]:
        """{"pixel_accuracy", "iou", "mean_iou", "f1", "precision", "recall", "images"}."""
        total = self.tp + self.fp + self.fn + self.tn
        union = self.tp + self.fp + self.fn

        def ratio(a: int, b: int) -> float:
            return a / b if b else math.nan

        return {
            "pixel_accuracy": ratio(self.tp + self.tn, total),
            "iou": ratio(self.tp, union) if union else 1.0,
            "mean_iou": float(np.mean(self.image_ious)) if self.image_ious else math.nan,
            "f1": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn) if union else 1.0,
            "precision": ratio(self.tp, self.tp + self.fp),
            "recall": ratio(self.tp, self.tp + self.fn),
            "images": float(len(self.image_ious)),
        }


def segmentation_metrics(
    predicted: npt.ArrayLike, truth: npt.ArrayLike, threshold: float = 0.5
) -> dict[str, float]:
    """Scores for stacks (N, H, W) or single masks (H, W) of predictions and truths."""
    pred = np.asarray(predicted)
    true = np.asarray(truth)
    if pred.ndim == 2:
        pred, true = pred[None], true[None]
    meter = SegmentationMeter(threshold=threshold)
    for p, t in zip(pred, true, strict=True):
        meter.update(p, t)
    return meter.result()
