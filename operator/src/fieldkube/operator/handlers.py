"""kopf wiring, kept thin: each handler parses the body, calls the reconciler, and lets kopf retry on errors.

Handlers: create/resume (ensure the MPIJob; idempotent), spec.runPolicy.suspend changes, deletion
(finalizer: MLflow run killed, MPIJob deleted), events of owned MPIJobs and pods (status sync), a timer for
progress and the pending timeout, and a timer for ttlSecondsAfterFinished.
"""

from __future__ import annotations

import logging
import os
import random
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from fieldkube.operator import metrics, names, spec
from fieldkube.operator.kube import Cluster, load_config
from fieldkube.operator.mpijob_builder import MlflowCredentials
from fieldkube.operator.reconcile import OperatorConfig, OwnershipConflictError, Reconciler, timed
from fieldkube.operator.status import is_terminal

TJ = (spec.GROUP, spec.VERSION, spec.PLURAL)
SYNC_INTERVAL_S = float(os.environ.get("FIELDKUBE_SYNC_INTERVAL_SECONDS", "10"))
TTL_INTERVAL_S = float(os.environ.get("FIELDKUBE_TTL_INTERVAL_SECONDS", "5"))
STORAGE_PREFIX = "fieldkube.io"

_reconciler: Reconciler | None = None


def reconciler() -> Reconciler:
    if _reconciler is None:
        raise kopf.TemporaryError("operator not started yet", delay=1)
    return _reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Progress in annotations (status stays ours), quiet events, peering, the reconciler and /metrics."""
    global _reconciler
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STORAGE_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{STORAGE_PREFIX}/cleanup"
    # The TTL timer deletes its own job: the deletion waits for that timer to exit, re-checked this often
    # (kopf's default, 60 s, would hold every expired job that long).
    settings.background.cancellation_polling = 1
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = int(os.environ.get("FIELDKUBE_WORKERS", "16"))
    settings.watching.server_timeout = 300
    settings.peering.priority = int(os.environ.get("FIELDKUBE_PEERING_PRIORITY", random.randint(1, 2**30)))
    settings.peering.name = os.environ.get("FIELDKUBE_PEERING_NAME", "fieldkube-operator")
    settings.peering.clusterwide = True
    secret = os.environ.get("FIELDKUBE_MLFLOW_CREDENTIALS_SECRET") or None
    env_names = os.environ.get("FIELDKUBE_MLFLOW_CREDENTIALS_ENV", "")
    config = OperatorConfig(
        mlflow_tracking_uri=os.environ.get("FIELDKUBE_MLFLOW_TRACKING_URI") or None,
        mlflow_credentials=MlflowCredentials(secret, tuple(n for n in env_names.split(",") if n))
        if secret
        else None,
    )
    _reconciler = Reconciler(Cluster(load_config()), config)
    port = int(os.environ.get("FIELDKUBE_METRICS_PORT", "8080"))
    if port:
        metrics.serve(port, os.environ.get("FIELDKUBE_BIND_ADDRESS", "0.0.0.0"))


def _parse(body: kopf.Body) -> spec.TrainingJobSpec:
    try:
        return spec.parse_spec(dict(body["spec"]))
    except ValidationError as exc:
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc


@kopf.on.resume(*TJ)
@kopf.on.create(*TJ)
def ensure_children(body: kopf.Body, namespace: str | None, name: str, logger: kopf.Logger, **_: Any) -> None:
    """Create the MPIJob (once: a deterministic name makes a retry or a restart find it)."""
    with timed("create"):
        rec = reconciler()
        if is_terminal(dict(body.get("status") or {})):
            return
        tj_spec = _parse(body)
        mpijob = rec.build(dict(body), tj_spec)
        kopf.adopt(mpijob, owner=body, nested=None)
        try:
            created = rec.ensure_mpijob(dict(body), mpijob)
        except OwnershipConflictError as exc:
            raise kopf.TemporaryError(str(exc), delay=5) from exc
        if created:
            # The new MPIJob's ADDED event syncs the status: this handler is free for the next job at once.
            logger.info(f"created MPIJob {mpijob['metadata']['name']}")
        else:  # found after a restart: no event is coming for it
            rec.request_sync(str(namespace), name)


@kopf.on.update(*TJ, field="spec.runPolicy.suspend")
def suspend_changed(namespace: str | None, name: str, new: Any, **_: Any) -> None:
    with timed("suspend"):
        reconciler().set_suspended(str(namespace), name, bool(new))
        reconciler().request_sync(str(namespace), name)


@kopf.on.delete(*TJ)
def cleanup(body: kopf.Body, **_: Any) -> None:
    with timed("delete"):
        reconciler().on_deleted(dict(body))


@kopf.on.event(
    names.MPIJOB_GROUP, names.MPIJOB_VERSION, names.MPIJOB_PLURAL, labels={names.JOB_LABEL: kopf.PRESENT}
)
def mpijob_changed(namespace: str | None, labels: kopf.Labels, type: str, **_: Any) -> None:
    if not type:  # the initial listing: the TrainingJob's resume handler syncs it
        return
    with timed("mpijob-event"):
        reconciler().request_sync(str(namespace), labels[names.JOB_LABEL])


@kopf.on.event("", "v1", "pods", labels={names.JOB_LABEL: kopf.PRESENT})
def pod_changed(namespace: str | None, labels: kopf.Labels, type: str, **_: Any) -> None:
    if not type:
        return
    with timed("pod-event"):
        reconciler().request_sync(str(namespace), labels[names.JOB_LABEL])


@kopf.timer(
    *TJ,
    interval=SYNC_INTERVAL_S,
    initial_delay=SYNC_INTERVAL_S,
    when=lambda status, **_: not is_terminal(dict(status)),
)
def refresh(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    """Progress from MLflow, and the pending timeout (which no event announces)."""
    rec = reconciler()
    if not rec.refresh_due(dict(body), datetime.now(UTC)):
        return
    with timed("refresh"):
        rec.request_sync(str(namespace), name, tracking=True)


@kopf.timer(
    *TJ,
    interval=TTL_INTERVAL_S,
    when=lambda status, spec, **_: (
        is_terminal(dict(status)) and spec.get("runPolicy", {}).get("ttlSecondsAfterFinished") is not None
    ),
)
def expire(body: kopf.Body, **_: Any) -> None:
    with timed("ttl"):
        reconciler().expire_if_due(dict(body))
