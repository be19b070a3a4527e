"""What the handlers do, without kopf: ensure the MPIJob, write the status, apply terminal side effects.

Each step reads the world, calls a pure function (builder or status) and applies the difference. Syncs of
one TrainingJob are coalesced: events arriving while a sync runs mark it dirty and it runs once more.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from fieldkube.operator import metrics, mlflow_client, names
from fieldkube.operator.kube import Cluster, Obj, merge_patch
from fieldkube.operator.mpijob_builder import MlflowCredentials, build_mpijob
from fieldkube.operator.spec import TrainingJobSpec, effective_training, parse_spec
from fieldkube.operator.status import (
    PENDING_TIMEOUT_REASON,
    Tracking,
    compute_status,
    is_terminal,
    parse_time,
    previous_status,
    unscheduled_pods,
)
from fieldkube.operator.status_model import TrainingJobStatus

log = logging.getLogger("fieldkube.operator")
LOG_TAIL_LINES = 20
# Pods whose FailedScheduling events are read when no pod condition explains a pending job.
MAX_EVENT_LOOKUPS = 2
FULL_RESYNC_S = 60.0


class OwnershipConflictError(Exception):
    """An object with the child's name exists but belongs to something else (e.g. a deleted job's MPIJob)."""


@dataclass
class OperatorConfig:
    """Operator-wide settings (CLI flags / environment)."""

    mlflow_tracking_uri: str | None = None
    mlflow_credentials: MlflowCredentials | None = None
    """Given to every trainer pod (envFrom), when the tracking server wants credentials."""


@dataclass
class _SyncState:
    dirty: bool = True
    tracking: bool = False


@dataclass
class Reconciler:
    cluster: Cluster
    config: OperatorConfig
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _inflight: dict[tuple[str, str], _SyncState] = field(default_factory=dict)
    _last_sync: dict[tuple[str, str], float] = field(default_factory=dict)

    # ---- children ---------------------------------------------------------------------------------

    def ensure_mpijob(self, body: Obj, mpijob: Obj) -> bool:
        """Create the MPIJob unless it exists; True when this call created it. Idempotent."""
        meta = body["metadata"]
        try:
            self.cluster.create_mpijob(mpijob)
            return True
        except ApiException as exc:
            if namespace_terminating(exc):  # the job goes with its namespace: nothing to start
                log.info("not creating %s: namespace %s is being deleted", meta["name"], meta["namespace"])
                return False
            if exc.status != 409:
                raise
        existing = self.cluster.get_mpijob(meta["namespace"], mpijob["metadata"]["name"])
        owners = [
            ref.get("uid") for ref in ((existing or {}).get("metadata") or {}).get("ownerReferences") or []
        ]
        if existing is not None and meta["uid"] not in owners:
            raise OwnershipConflictError(
                f"MPIJob {meta['namespace']}/{mpijob['metadata']['name']} exists and is not owned by this "
                "TrainingJob (a deleted job's MPIJob still being removed?)"
            )
        return False

    def build(self, body: Obj, tj_spec: TrainingJobSpec) -> Obj:
        meta = body["metadata"]
        return build_mpijob(
            meta["name"],
            meta["namespace"],
            meta["uid"],
            tj_spec,
            self.config.mlflow_tracking_uri,
            self.config.mlflow_credentials,
        )

    def set_suspended(self, namespace: str, name: str, suspended: bool) -> None:
        try:
            self.cluster.patch_mpijob(
                namespace, names.mpijob_name(name), {"spec": {"runPolicy": {"suspend": suspended}}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ---- status -----------------------------------------------------------------------------------

    def request_sync(self, namespace: str, name: str, tracking: bool = False) -> None:
        """Sync one job's status now, or make the running sync of it go round once more."""
        key = (namespace, name)
        with self._guard:
            state = self._inflight.get(key)
            if state is not None:
                state.dirty = True
                state.tracking = state.tracking or tracking
                return
            state = self._inflight[key] = _SyncState(tracking=tracking)
        try:
            while True:
                with self._guard:
                    if not state.dirty:
                        del self._inflight[key]
                        return
                    state.dirty, use_tracking, state.tracking = False, state.tracking, False
                self.sync_status(namespace, name, use_tracking)
        except BaseException:
            with self._guard:
                self._inflight.pop(key, None)
            raise

    def refresh_due(self, body: Obj, now: datetime) -> bool:
        """Whether a timer tick must sync: progress to read, a pending timeout due, or a periodic resync.

        Events drive every other change, so an idle tick costs no API call.
        """
        meta, status = body["metadata"], body.get("status") or {}
        key = (meta["namespace"], meta["name"])
        if time.monotonic() - self._last_sync.get(key, 0.0) > FULL_RESYNC_S:
            return True
        if status.get("observedGeneration") != meta.get("generation"):
            return True
        tj_spec = parse_spec(body["spec"])
        if status.get("phase") == "Running" and (
            tj_spec.mlflow.trackingUri or self.config.mlflow_tracking_uri
        ):
            return True
        created = parse_time(meta.get("creationTimestamp"))
        timeout = tj_spec.pendingTimeoutSeconds
        return bool(
            status.get("phase") in {None, "Pending"}
            and timeout
            and created is not None
            and now >= created + timedelta(seconds=timeout)
        )

    def _tracking(self, tj: Obj, tj_spec: TrainingJobSpec, previous: TrainingJobStatus) -> Tracking | None:
        uri = tj_spec.mlflow.trackingUri or self.config.mlflow_tracking_uri
        if not uri:
            return None
        epochs = effective_training(tj_spec).get("train", {}).get("epochs")
        try:
            run = mlflow_client.find_run(uri, tj_spec.mlflow.experiment, tj["metadata"]["uid"])
        except mlflow_client.MlflowError as exc:
            log.warning("MLflow unavailable for %s: %s", tj["metadata"]["name"], exc)
            return None
        if run is None:
            return None
        tracking = mlflow_client.tracking_from_run(uri, run, epochs)
        if tracking.registered_model is not None:
            registered = tracking.registered_model.model_copy(update={"alias": tj_spec.mlflow.alias})
            tracking = Tracking(tracking.mlflow, tracking.progress, registered)
        return tracking

    def sync_status(self, namespace: str, name: str, with_tracking: bool = False) -> None:
        self._last_sync[(namespace, name)] = time.monotonic()
        tj = self.cluster.get_trainingjob(namespace, name)
        if tj is None or tj["metadata"].get("deletionTimestamp"):
            self._last_sync.pop((namespace, name), None)
            return
        tj_spec = parse_spec(tj["spec"])
        previous = previous_status(tj)
        mpijob = self.cluster.get_mpijob(namespace, names.mpijob_name(name))
        owners = [r.get("uid") for r in ((mpijob or {}).get("metadata") or {}).get("ownerReferences") or []]
        if mpijob is not None and tj["metadata"]["uid"] not in owners:
            mpijob = None
        pods = self.cluster.list_job_pods(namespace, name)
        now = datetime.now(UTC)
        tracking = self._tracking(tj, tj_spec, previous) if with_tracking else None
        status = compute_status(tj, tj_spec, mpijob, pods, [], now, tracking)
        if status.phase in {"Pending", "Failed"} and status.reason in {"Starting", "NotStarted"}:
            events = [
                event
                for pod in unscheduled_pods(pods)[:MAX_EVENT_LOOKUPS]
                for event in self.cluster.list_scheduling_events(namespace, pod)
            ]
            if events:
                status = compute_status(tj, tj_spec, mpijob, pods, events, now, tracking)
        newly_terminal = is_terminal(status.as_patch()) and not is_terminal(tj.get("status"))
        if newly_terminal and tracking is None:
            tracking = self._tracking(tj, tj_spec, previous)
            status = compute_status(tj, tj_spec, mpijob, pods, [], now, tracking)
        diagnosis = status.diagnosis
        if (
            diagnosis is not None
            and diagnosis.pod
            and not diagnosis.logTail
            and previous.diagnosis != diagnosis
        ):
            tail = self.cluster.pod_log_tail(
                namespace, diagnosis.pod, names.TRAINER_CONTAINER, LOG_TAIL_LINES
            )
            status.diagnosis = diagnosis.model_copy(update={"logTail": tail})
        new = status.as_patch()
        patch = merge_patch(tj.get("status") or {}, new)
        if patch:
            self.cluster.patch_trainingjob_status(namespace, name, patch)
        if newly_terminal:
            self._on_terminal(tj, tj_spec, status)
        meta = tj["metadata"]
        metrics.record_phase(
            meta["uid"],
            namespace,
            (tj.get("status") or {}).get("phase"),
            status.phase,
            meta.get("creationTimestamp"),
            status.startTime,
            status.completionTime,
            status.gpus,
            status.reason,
            now,
        )

    def _on_terminal(self, tj: Obj, tj_spec: TrainingJobSpec, status: TrainingJobStatus) -> None:
        """Side effects of a job ending: stop unstarted pods on a pending timeout, close the MLflow run."""
        meta = tj["metadata"]
        timed_out = any(c.type == "Failed" and c.reason == PENDING_TIMEOUT_REASON for c in status.conditions)
        if timed_out:
            # Pending pods would start later if kept: a suspended MPIJob has its pods deleted.
            self.set_suspended(meta["namespace"], meta["name"], True)
        uri = tj_spec.mlflow.trackingUri or self.config.mlflow_tracking_uri
        if status.phase == "Failed" and uri and status.mlflow.runId and status.mlflow.runStatus == "RUNNING":
            try:
                mlflow_client.end_run(uri, status.mlflow.runId, "FAILED")
            except mlflow_client.MlflowError as exc:
                log.warning("could not mark MLflow run %s failed: %s", status.mlflow.runId, exc)

    # ---- lifecycle --------------------------------------------------------------------------------

    def on_deleted(self, body: Obj) -> None:
        """Kill the MLflow run if it still runs, delete the MPIJob (its pods follow), forget the job."""
        meta, status = body["metadata"], body.get("status") or {}
        tj_spec = parse_spec(body["spec"])
        uri = tj_spec.mlflow.trackingUri or self.config.mlflow_tracking_uri
        run_id = (status.get("mlflow") or {}).get("runId")
        if uri and not run_id:
            try:
                run = mlflow_client.find_run(uri, tj_spec.mlflow.experiment, meta["uid"])
                run_id = (
                    (run or {}).get("info", {}).get("run_id")
                    if run and run["info"]["status"] == "RUNNING"
                    else None
                )
            except mlflow_client.MlflowError as exc:
                log.warning("MLflow unavailable while deleting %s: %s", meta["name"], exc)
        if uri and run_id and not is_terminal(status):
            try:
                mlflow_client.end_run(uri, run_id, "KILLED")
            except mlflow_client.MlflowError as exc:
                log.warning("could not mark MLflow run %s killed: %s", run_id, exc)
        self.cluster.delete_mpijob(meta["namespace"], names.mpijob_name(meta["name"]))
        metrics.forget_job(meta["uid"])

    def expire_if_due(self, body: Obj, now: datetime | None = None) -> bool:
        """Delete a finished job once ttlSecondsAfterFinished has passed; True when deleted."""
        tj_spec = parse_spec(body["spec"])
        ttl = tj_spec.runPolicy.ttlSecondsAfterFinished
        status = body.get("status") or {}
        finished = parse_time(status.get("completionTime"))
        if ttl is None or not is_terminal(status) or finished is None:
            return False
        if (now or datetime.now(UTC)) < finished + timedelta(seconds=ttl):
            return False
        meta = body["metadata"]
        log.info(
            "deleting %s/%s: finished %ss ago (ttlSecondsAfterFinished)", meta["namespace"], meta["name"], ttl
        )
        self.cluster.delete_trainingjob(meta["namespace"], meta["name"])
        return True


def namespace_terminating(exc: ApiException) -> bool:
    """The API server refuses new objects in a namespace being deleted (403, cause NamespaceTerminating)."""
    return exc.status == 403 and "NamespaceTerminating" in str(exc.body or "")


def timed(handler: str) -> Any:
    """Context manager counting one reconcile, its duration and its errors."""
    return _Timed(handler)


class _Timed:
    def __init__(self, handler: str) -> None:
        self.handler = handler
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        metrics.RECONCILES.labels(handler=self.handler).inc()

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        metrics.RECONCILE_SECONDS.labels(handler=self.handler).observe(time.perf_counter() - self.start)
        if kind is not None:
            metrics.RECONCILE_ERRORS.labels(handler=self.handler).inc()
