"""Held-out evaluation of a trained model on prepared tiles: counting vs the classical baseline, segmentation.

Counter: MAE, RMSE, relative error (zero-count tiles excluded), R², overall, per seed-000 count bin and
per hazard tag (glare, dust, shadow, none), for the CNN and for the classical counter on the same tiles,
with the time per tile of each. Segmenter: pixel accuracy, IoU (global and per-image mean), F1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fieldkube.trainer.loader import PreparedDataset


def counting_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """n, MAE, RMSE, MRE (tiles with truth > 0), R² and the same per seed-000 bin (`by_bin`)."""
    from fieldkube.vision.metrics import counting_metrics as vision_counting_metrics

    return vision_counting_metrics(truth, predicted)


@torch.no_grad()
def _predict(model: nn.Module, inputs: torch.Tensor, device: torch.device) -> np.ndarray:
    out: np.ndarray = model(inputs.to(device)).float().cpu().numpy()
    return out


def evaluate_counter(
    model: nn.Module,
    dataset: PreparedDataset,
    device: torch.device,
    density_scale: float,
    batch_size: int = 8,
    classical: bool = True,
    limit: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report and the per-tile rows (id, truth, cnn, classical, tags)."""
    from fieldkube.vision.classical import count_classical
    from fieldkube.vision.normalize import batch_to_tensor

    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows: list[dict[str, Any]] = []
    cnn_seconds = classical_seconds = 0.0
    for start in range(0, n, batch_size):
        samples = [dataset.raw(i) for i in range(start, min(n, start + batch_size))]
        images = np.stack([s[0] for s in samples])
        began = time.perf_counter()
        maps = _predict(model, batch_to_tensor(images), device)[:, 0] / density_scale
        cnn_seconds += time.perf_counter() - began
        for (image, _, rec), density in zip(samples, maps, strict=True):
            row = {
                "id": rec["id"],
                "truth": float(rec["count"]),
                "cnn": float(density.sum(dtype=np.float64)),
                "tags": rec["tags"] or "none",
            }
            if classical:
                began = time.perf_counter()
                row["classical"] = float(count_classical(image))
                classical_seconds += time.perf_counter() - began
            rows.append(row)
    truth = np.array([r["truth"] for r in rows])
    report: dict[str, Any] = {"task": "counter", "tiles": len(rows)}
    methods = ["cnn", "classical"] if classical else ["cnn"]
    for method in methods:
        predicted = np.array([r[method] for r in rows])
        tags = [r["tags"] for r in rows]
        overall = counting_metrics(truth, predicted)
        by_bin = overall.pop("by_bin")
        report[method] = {"overall": overall, "by_bin": by_bin, "by_tag": _group_tags(truth, predicted, tags)}
    report["seconds_per_tile"] = {"cnn": cnn_seconds / max(len(rows), 1)}
    if classical:
        report["seconds_per_tile"]["classical"] = classical_seconds / max(len(rows), 1)
        report["speedup_cnn_vs_classical"] = classical_seconds / max(cnn_seconds, 1e-9)
    return report, rows


def _group_tags(truth: np.ndarray, predicted: np.ndarray, tags: list[str]) -> dict[str, dict[str, Any]]:
    """Metrics per hazard: a tile tagged 'glare,dust' counts for both glare and dust."""
    groups: dict[str, dict[str, Any]] = {}
    for name in sorted({t for tag in tags for t in tag.split(",")}):
        keep = np.array([name in tag.split(",") for tag in tags])
        metrics = counting_metrics(truth[keep], predicted[keep])
        metrics.pop("by_bin")
        groups[name] = metrics
    return groups


def evaluate_segmenter(
    model: nn.Module,
    dataset: PreparedDataset,
    device: torch.device,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    """Pixel accuracy, IoU (global over all pixels, and mean per tile), F1 at threshold 0.5."""
    from fieldkube.vision.metrics import segmentation_metrics
    from fieldkube.vision.normalize import batch_to_tensor

    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    predictions, truths = [], []
    for start in range(0, n, batch_size):
        samples = [dataset.raw(i) for i in range(start, min(n, start + batch_size))]
        logits = _predict(model, batch_to_tensor(np.stack([s[0] for s in samples])), device)[:, 0]
        predictions.extend(list((logits > 0).astype(np.uint8)))
        truths.extend([s[1] > 0.5 for s in samples])
    report: dict[str, Any] = {"task": "segmenter", "tiles": n}
    report.update(segmentation_metrics(np.stack(predictions), np.stack(truths)))
    return report


def write_overlays(
    model: nn.Module,
    dataset: PreparedDataset,
    device: torch.device,
    directory: Path,
    count: int,
    density_scale: float,
) -> list[Path]:
    """PNG overlays (prediction over image) of the first `count` tiles, for people to look at."""
    from fieldkube.vision.imageio import encode_png
    from fieldkube.vision.normalize import batch_to_tensor
    from fieldkube.vision.overlay import density_overlay, mask_overlay

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(dataset))):
        image, _, rec = dataset.raw(index)
        output = _predict(model, batch_to_tensor(image[None]), device)[0, 0]
        if dataset.task == "counter":
            picture = density_overlay(image, output / density_scale)
        else:
            picture = mask_overlay(image, (output > 0).astype(np.uint8))
        path = directory / f"{rec['id']}.png"
        path.write_bytes(encode_png(picture))
        paths.append(path)
    return paths
