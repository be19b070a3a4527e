"""The few MLflow REST calls the operator needs (find a job's run, read progress, mark it killed), via httpx.

The trainer tags its run with the TrainingJob's uid (`fieldkube.job.uid`) and logs progress metrics
(`progress_epoch`, `progress_step`, `progress_percent`, `train_loss`, `images_per_second`); on success it
tags the registered model name and version. The names are the contract's (`fieldkube.contract.names`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx

from fieldkube.contract.names import (
    IMAGES_PER_SECOND,
    JOB_UID_TAG,
    MODEL_VERSION_TAG,
    PROGRESS_EPOCH,
    PROGRESS_METRICS,
    PROGRESS_PERCENT,
    PROGRESS_STEP,
    REGISTERED_MODEL_TAG,
    TRAIN_LOSS,
)
from fieldkube.operator.status import Tracking
from fieldkube.operator.status_model import MlflowStatus, Progress, RegisteredModelStatus

TIMEOUT = httpx.Timeout(5.0)
SEARCH_PAGE = 1000


class MlflowError(Exception):
    """The tracking server could not be reached or answered with an error."""


def _http_base(uri: str) -> str | None:
    """Only HTTP tracking servers can be read by the operator (a sqlite URI lives in the pods)."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def _call(method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    try:
        response = httpx.request(method, url, timeout=TIMEOUT, **kwargs)
    except httpx.HTTPError as exc:
        raise MlflowError(f"{method} {url}: {exc}") from exc
    if response.status_code == 404:
        return {}
    if response.status_code >= 400:
        raise MlflowError(f"{method} {url}: HTTP {response.status_code}: {response.text[:200]}")
    result: dict[str, Any] = response.json()
    return result


def find_run(uri: str, experiment: str, job_uid: str) -> dict[str, Any] | None:
    """The newest run of the experiment tagged with this job's uid, or None."""
    base = _http_base(uri)
    if base is None:
        return None
    found = _call(
        "GET", f"{base}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}
    )
    experiment_id = (found.get("experiment") or {}).get("experiment_id")
    if not experiment_id:
        return None
    body = {
        "experiment_ids": [experiment_id],
        "filter": f"tags.`{JOB_UID_TAG}` = '{job_uid}'",
        "max_results": 1,
        "order_by": ["attributes.start_time DESC"],
    }
    runs = _call("POST", f"{base}/api/2.0/mlflow/runs/search", json=body).get("runs") or []
    return dict(runs[0]) if runs else None


def running_runs_by_job(uri: str, experiment: str) -> dict[str, dict[str, Any]]:
    """Every RUNNING run of the experiment that carries a job uid, newest per uid: one search (paged) for all
    of an experiment's running jobs, instead of one per job and interval."""
    base = _http_base(uri)
    if base is None:
        return {}
    found = _call(
        "GET", f"{base}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}
    )
    experiment_id = (found.get("experiment") or {}).get("experiment_id")
    if not experiment_id:
        return {}
    by_job: dict[str, dict[str, Any]] = {}
    token: str | None = None
    while True:
        body: dict[str, Any] = {
            "experiment_ids": [experiment_id],
            "filter": "attributes.status = 'RUNNING'",
            "max_results": SEARCH_PAGE,
            "order_by": ["attributes.start_time ASC"],
        }
        if token:
            body["page_token"] = token
        page = _call("POST", f"{base}/api/2.0/mlflow/runs/search", json=body)
        for run in page.get("runs") or []:
            tags = {t["key"]: t["value"] for t in (run.get("data") or {}).get("tags") or []}
            if JOB_UID_TAG in tags:
                by_job[tags[JOB_UID_TAG]] = dict(run)  # ascending start: the newest run wins
        token = page.get("next_page_token")
        if not token:
            return by_job


def tracking_from_run(uri: str, run: dict[str, Any], planned_epochs: int | None) -> Tracking:
    """Status fields from one MLflow run (as the REST API returns it)."""
    info, data = run.get("info") or {}, run.get("data") or {}
    metrics = {m["key"]: m for m in data.get("metrics") or []}
    tags = {t["key"]: t["value"] for t in data.get("tags") or []}
    run_id, experiment_id = info.get("run_id"), info.get("experiment_id")
    base = _http_base(uri)
    mlflow = MlflowStatus(
        runId=run_id,
        experimentId=experiment_id,
        runStatus=info.get("status"),
        runUrl=f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base and run_id else None,
    )

    def value(key: str) -> float | None:
        return float(metrics[key]["value"]) if key in metrics else None

    progress = None
    if any(key in metrics for key in PROGRESS_METRICS):
        latest = max(int(m.get("timestamp", 0)) for m in metrics.values())
        step = value(PROGRESS_STEP)
        progress = Progress(
            epoch=value(PROGRESS_EPOCH),
            epochs=planned_epochs,
            step=int(step) if step is not None else None,
            percent=value(PROGRESS_PERCENT),
            loss=value(TRAIN_LOSS),
            imagesPerSecond=value(IMAGES_PER_SECOND),
            updatedAt=datetime.fromtimestamp(latest / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    registered = None
    if REGISTERED_MODEL_TAG in tags and MODEL_VERSION_TAG in tags:
        registered = RegisteredModelStatus(name=tags[REGISTERED_MODEL_TAG], version=tags[MODEL_VERSION_TAG])
    return Tracking(mlflow=mlflow, progress=progress, registered_model=registered)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Mark a run KILLED or FAILED (the trainer could not: its pods were deleted or died)."""
    base = _http_base(uri)
    if base is None:
        return
    body = {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)}
    _call("POST", f"{base}/api/2.0/mlflow/runs/update", json=body)
