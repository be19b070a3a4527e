"""What a scaling run bought besides images/s: time to a target loss and the trained model's test figures.

Seed 003 weighs asynchronous training's speed against the accuracy it loses (time-to-accuracy 12.3 h
sync vs 16.5 h async, accuracy lost); fieldkube-scale does the same per strategy from what each run
leaves behind: `loss_curve.json` ([seconds since start, global step, global-batch loss]) and the model
bundle, scored here on the dataset's test split with the run's own config (loss, density scale).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from fieldkube.contract.config import TrainingConfig

LOSS_WINDOW = 3  # global batches averaged before comparing with the target (single batches are noisy)


def smoothed(curve: list[list[float]], window: int = LOSS_WINDOW) -> list[tuple[float, float]]:
    """(seconds, mean loss of the last `window` global batches) at each point of the curve."""
    losses = [point[2] for point in curve]
    return [
        (float(point[0]), statistics.fmean(losses[max(0, i + 1 - window) : i + 1]))
        for i, point in enumerate(curve)
    ]


def time_to_loss(curve: list[list[float]], target: float, window: int = LOSS_WINDOW) -> float | None:
    """Seconds until the smoothed loss first reaches `target` (None: never reached)."""
    for seconds, loss in smoothed(curve, window):
        if loss <= target:
            return seconds
    return None


def final_loss(curve: list[list[float]], window: int = LOSS_WINDOW) -> float | None:
    """Mean training loss of the last `window` global batches."""
    return statistics.fmean(p[2] for p in curve[-window:]) if curve else None


def test_quality(bundle_dir: Path, config: TrainingConfig) -> dict[str, float]:
    """Test-split loss of the saved model (the training loss function) and its headline figure: count
    MAE for a counter, IoU for a segmenter. Empty when the dataset has no test split."""
    from fieldkube.trainer.dataset_format import read_manifest
    from fieldkube.trainer.evaluate import evaluate_counter, evaluate_segmenter
    from fieldkube.trainer.loader import PreparedDataset
    from fieldkube.trainer.losses import resolve_loss
    from fieldkube.vision.bundle import load_bundle

    data = config.data
    if "test" not in read_manifest(Path(data.path))["splits"]:
        return {}
    test = PreparedDataset(data.path, "test", data, config.train.seed, augment=False)
    if not len(test):
        return {}
    model = load_bundle(bundle_dir).model
    _, loss_fn = resolve_loss(config.train.loss, test.task)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(test), 8):
            items = [test[(-1, i)] for i in range(start, min(len(test), start + 8))]
            inputs = torch.stack([i[0] for i in items])
            targets = torch.stack([i[1] for i in items])
            total += float(loss_fn(model(inputs).float(), targets)) * len(items)
    quality: dict[str, Any] = {"test_loss": total / len(test), "test_tiles": len(test)}
    if test.task == "counter":
        report, _ = evaluate_counter(model, test, torch.device("cpu"), data.density_scale, classical=False)
        quality["test_mae"] = float(report["cnn"]["overall"]["mae"])
    else:
        quality["test_iou"] = float(evaluate_segmenter(model, test, torch.device("cpu"))["iou"])
    return quality
