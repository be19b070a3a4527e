"""What rank 0 does after the last step: evaluate, write overlays and report, save and register the model.

Outputs under `output_dir`: model/ (the bundle: model.safetensors + model.json), eval/report.json,
eval/overlays/*.png, summary.json. All are logged to the MLflow run (report and overlays under
`evaluation`, the bundle under `model`), then the bundle is registered and given the alias.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fieldkube.trainer.config import TrainingConfig
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.evaluate import evaluate_counter, evaluate_segmenter, write_overlays
from fieldkube.trainer.loader import PreparedDataset
from fieldkube.trainer.tracking import Tracker, flatten

log = logging.getLogger("fieldkube.finish")


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The few numbers that summarise a report (logged as MLflow metrics and stored in the bundle)."""
    if report.get("task") == "counter":
        out = {f"test_{k}_cnn": v for k, v in report["cnn"]["overall"].items()}
        if "classical" in report:
            out.update({f"test_{k}_classical": v for k, v in report["classical"]["overall"].items()})
        return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}
    if report.get("task") == "segmenter":
        return {
            f"test_{k}": float(v) for k, v in report.items() if isinstance(v, int | float) and k != "tiles"
        }
    return {}


def finish_run(
    config: TrainingConfig,
    model: nn.Module,
    task: str,
    tile: int,
    test_set: Any,
    state: Any,
    tracker: Tracker,
    device: torch.device,
    trained: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    out = Path(config.output_dir)
    eval_dir = out / "eval"
    report: dict[str, Any] = {}
    model.eval()
    if config.train.evaluate and task != "custom" and isinstance(test_set, PreparedDataset) and len(test_set):
        if task == "counter":
            report, rows = evaluate_counter(model, test_set, device, config.data.density_scale)
            write_json_atomic(eval_dir / "tiles.json", rows)
        else:
            report = evaluate_segmenter(model, test_set, device)
        write_overlays(
            model,
            test_set,
            device,
            eval_dir / "overlays",
            config.train.eval_samples,
            config.data.density_scale,
        )
        write_json_atomic(eval_dir / "report.json", report)
        log.info("evaluation on %d test tiles: %s", len(test_set), json.dumps(headline_metrics(report)))
    headline = headline_metrics(report)
    trained = {**trained, "history": state.history}
    bundle_dir = out / "model"
    if task in ("counter", "segmenter"):
        from fieldkube.vision.bundle import save_bundle

        save_bundle(
            bundle_dir,
            model,
            config.model.name,
            config.model.params,
            tile=tile or 224,
            density_scale=config.data.density_scale if task == "counter" else 1.0,
            metrics=headline,
            trained=trained,
        )
    else:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(bundle_dir / "model.safetensors"))
        write_json_atomic(
            bundle_dir / "model.json",
            {
                "format": 1,
                "name": config.model.name,
                "task": task,
                "params": config.model.params,
                "trained": trained,
            },
        )
    trained_summary = {k: v for k, v in trained.items() if k != "history"}
    summary: dict[str, Any] = {
        "task": task,
        "metrics": headline,
        "trained": trained_summary,
        "bundle": str(bundle_dir),
    }
    registered = None
    if tracker.active:
        tracker.log_metrics(headline, step=state.global_step)
        if eval_dir.is_dir():
            tracker.log_artifacts(eval_dir, "evaluation")
        registered = tracker.register_bundle(bundle_dir, task) if task != "custom" else None
        tracker.set_tags({f"fieldkube.{k}": str(v) for k, v in flatten(trained_summary).items()})
        summary["mlflow"] = {"run_id": tracker.run_id, "registered": registered}
    write_json_atomic(out / "summary.json", summary)
    log.info("model bundle written to %s", bundle_dir)
    return report, registered
