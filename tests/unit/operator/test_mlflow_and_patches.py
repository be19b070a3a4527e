"""MLflow run → status fields, names shared with the trainer, and status merge patches."""

from __future__ import annotations

from fieldkube.operator import mlflow_client
from fieldkube.operator.kube import merge_patch


def test_progress_and_registered_model_are_read_from_a_run() -> None:
    run = {
        "info": {"run_id": "abc", "experiment_id": "7", "status": "FINISHED"},
        "data": {
            "metrics": [
                {"key": "progress_epoch", "value": 2, "timestamp": 1767225600000, "step": 40},
                {"key": "progress_step", "value": 40, "timestamp": 1767225600000, "step": 40},
                {"key": "progress_percent", "value": 50.0, "timestamp": 1767225600000, "step": 40},
                {"key": "train_loss", "value": 0.25, "timestamp": 1767225600000, "step": 40},
                {"key": "images_per_second", "value": 120.5, "timestamp": 1767225600000, "step": 40},
            ],
            "tags": [
                {"key": "fieldkube.registered_model", "value": "fieldkube-counter"},
                {"key": "fieldkube.model_version", "value": "3"},
            ],
        },
    }
    tracking = mlflow_client.tracking_from_run("http://mlflow:5000/", run, 4)
    assert tracking.mlflow.runUrl == "http://mlflow:5000/#/experiments/7/runs/abc"
    assert tracking.progress is not None
    assert (tracking.progress.epoch, tracking.progress.step, tracking.progress.percent) == (2, 40, 50.0)
    assert tracking.progress.epochs == 4 and tracking.progress.imagesPerSecond == 120.5
    assert tracking.progress.updatedAt == "2026-01-01T00:00:00Z"
    assert tracking.registered_model is not None and tracking.registered_model.version == "3"


def test_a_run_without_metrics_has_no_progress_and_non_http_uris_are_not_queried() -> None:
    tracking = mlflow_client.tracking_from_run("http://m", {"info": {"run_id": "x"}, "data": {}}, None)
    assert tracking.progress is None and tracking.registered_model is None
    assert mlflow_client.find_run("sqlite:///mlflow.db", "exp", "uid") is None


def test_merge_patch_sets_changes_and_nulls_removed_keys() -> None:
    old = {"phase": "Running", "diagnosis": {"pod": "a"}, "progress": {"epoch": 1, "loss": 0.5}}
    new = {"phase": "Failed", "progress": {"epoch": 2, "loss": 0.5}}
    assert merge_patch(old, new) == {"phase": "Failed", "diagnosis": None, "progress": {"epoch": 2}}
    assert merge_patch(new, new) == {}
