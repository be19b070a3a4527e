"""What rank 0 does after the last step: evaluate, write overlays and report, save and register the model.

Outputs under `output_dir`: model/ (the bundle: model.safetensors + model.json, and for a counter or
segmenter golden.png, its golden sample), eval/report.json, eval/overlays/*.png, summary.json. All are
logged to the MLflow run (report and overlays under `evaluation`, the bundle directory as a whole under
`model`), then the bundle is registered and given the alias.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from fieldkube.contract.config import TrainingConfig
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.errors import DataError
from fieldkube.trainer.evaluate import evaluate_counter, evaluate_segmenter, write_overlays
from fieldkube.trainer.loader import PreparedDataset
from fieldkube.trainer.tracking import Tracker, flatten

if TYPE_CHECKING:
    from fieldkube.vision.golden import GoldenSample

log = logging.getLogger("fieldkube.finish")

GOLDEN_CANDIDATES = 32
"""The golden tile is picked among this many first test tiles (reading them all would cost a large split)."""


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The few numbers that summarise a report (logged as MLflow metrics and stored in the bundle)."""
    if report.get("task") == "counter":
        out = {f"test_{k}_cnn": v for k, v in report["cnn"]["overall"].items()}
        if "classical" in report:
            out.update({f"test_{k}_classical": v for k, v in report["classical"]["overall"].items()})
        if "source" in report:
            out.update({f"test_{k}_source": v for k, v in report["source"].items()})
        return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}
    if report.get("task") == "segmenter":
        out = {f"test_{k}": v for k, v in report.items() if k != "tiles"}
        out.update({f"test_{k}_source": v for k, v in report.get("source", {}).items() if k != "tiles"})
        return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}
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
    source_weights: dict[str, torch.Tensor] | None,
    trained: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Evaluate, save and register; a fine-tuned model's source (`source_weights`) is scored on the same
    test tiles, so the run itself says whether the adaptation beat the model it started from."""
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
        if source_weights is not None:
            report["source"] = _evaluate_source(model, source_weights, task, test_set, config, device)
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

        density_scale = config.data.density_scale if task == "counter" else 1.0
        save_bundle(
            bundle_dir,
            model,
            config.model.name,
            config.model.params,
            tile=tile or 224,
            density_scale=density_scale,
            metrics=headline,
            trained=trained,
            lineage=state.init_lineage,
            golden=golden_sample(model, task, tile or 224, test_set, density_scale),
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
                "lineage": state.init_lineage,
            },
        )
    trained_summary = {k: v for k, v in trained.items() if k != "history"}
    summary: dict[str, Any] = {
        "task": task,
        "metrics": headline,
        "trained": trained_summary,
        "bundle": str(bundle_dir),
        "lineage": state.init_lineage,
    }
    registered = None
    if tracker.active:
        tracker.log_metrics(headline, step=state.global_step)
        if eval_dir.is_dir():
            tracker.log_artifacts(eval_dir, "evaluation")
        registered = (
            tracker.register_bundle(bundle_dir, task, state.init_lineage) if task != "custom" else None
        )
        tracker.set_tags({f"fieldkube.{k}": str(v) for k, v in flatten(trained_summary).items()})
        summary["mlflow"] = {"run_id": tracker.run_id, "registered": registered}
    write_json_atomic(out / "summary.json", summary)
    log.info("model bundle written to %s", bundle_dir)
    return report, registered


def golden_sample(
    model: nn.Module, task: str, tile: int, test_set: Any, density_scale: float
) -> GoldenSample | None:
    """The bundle's golden sample: one test tile and the trained model's answer on it (fp32, on the
    model's device), which the service checks its own answer against at warm-up; None without a usable
    test split.

    A counter's tile is the one with the most objects among the first `GOLDEN_CANDIDATES`, so that a
    density_scale error moves the count visibly; a segmenter's the one whose building fraction is
    closest to one half, so that both buildings and background are there for wrong weights to get wrong.
    """
    from fieldkube.vision.golden import GoldenSample, compare_answers, expected_answer

    if not isinstance(test_set, PreparedDataset) or not len(test_set) or test_set.task != task:
        log.info("no golden sample recorded: no %s test split to take a tile from", task)
        return None
    try:
        candidates = range(min(GOLDEN_CANDIDATES, len(test_set)))
        if task == "counter":
            index = max(candidates, key=lambda i: float(test_set.record(i)["count"] or 0.0))
        else:
            index = min(candidates, key=lambda i: abs(float(np.mean(test_set.raw(i)[1])) - 0.5))
        image, _, record = test_set.raw(index)
    except DataError as error:
        log.warning("no golden sample recorded: the test split cannot be read (%s)", error)
        return None
    if image.shape != (tile, tile, 3):
        log.warning("no golden sample recorded: test tiles are %s, the model's tile is %d", image.shape, tile)
        return None
    answer = expected_answer(model, task, image, density_scale)
    log.info(
        "golden sample: test tile %d (%s), answer %s",
        index,
        record.get("id", "?"),
        json.dumps({key: round(value, 6) for key, value in answer.items()}),
    )
    if task == "counter" and compare_answers(task, {"count": answer["count"] / 2}, answer) is None:
        log.warning(
            "the golden count %.3f is too small for a density_scale error to show at warm-up", answer["count"]
        )
    return GoldenSample(image=image, answer=answer)


def _evaluate_source(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    task: str,
    test_set: PreparedDataset,
    config: TrainingConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The headline figures of the model a fine-tuned run started from, on the run's own test tiles."""
    source = copy.deepcopy(model)
    source.load_state_dict(weights)
    source.eval()
    if task == "counter":
        report, _ = evaluate_counter(source, test_set, device, config.data.density_scale, classical=False)
        return {k: v for k, v in report["cnn"]["overall"].items() if isinstance(v, int | float)}
    return {
        k: v for k, v in evaluate_segmenter(source, test_set, device).items() if isinstance(v, int | float)
    }
