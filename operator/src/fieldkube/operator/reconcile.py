"""What the operator does, without kopf: one level-triggered sync per TrainingJob, fed by watches.

A sync reads the TrainingJob, its MPIJob and its pods from in-memory caches (kept by watches, so it makes
no read call), calls the pure builder and status functions, and writes only the differences: the MPIJob
when it is missing (created once, recreated if someone deletes it), its suspend flag, the status when it
changed, the TTL deletion when due. Work arrives through one queue (events name a job; timeouts and
TTLs are queued for their deadline), served by a few worker threads, and only while this replica leads.
MLflow progress is fetched for all running jobs at once, one search per experiment and interval.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from fieldkube.operator import metrics, mlflow_client, names
from fieldkube.operator.informer import Cache, Key, trim_mpijob
from fieldkube.operator.kube import Cluster, Obj, merge_patch
from fieldkube.operator.mpijob_builder import MlflowCredentials, build_mpijob
from fieldkube.operator.spec import TrainingJobSpec, effective_training, parse_spec
from fieldkube.operator.status import (
    PENDING_TIMEOUT_REASON,
    Tracking,
    compute_status,
    is_terminal,
    log_tail_pod,
    parse_time,
    pending_since,
    previous_status,
    unscheduled_pods,
)
from fieldkube.operator.status_model import TrainingJobStatus
from fieldkube.operator.workqueue import WorkQueue
from fieldkube.operator.write_budget import WriteBudget

log = logging.getLogger("fieldkube.operator")
# Pods whose FailedScheduling events are read when no pod condition explains a pending job, and how old a
# pod must be first (the scheduler usually writes the pod's condition within a second; events cost a call).
MAX_EVENT_LOOKUPS = 2
EVENT_LOOKUP_AFTER_S = 5.0
# Written by earlier versions of the operator, which deleted children through a finalizer; removed on sight
# (owner references clean up, and a finalizer holds deletion hostage to the operator running).
LEGACY_FINALIZER = "fieldkube.io/cleanup"
RETRY_BASE_S, RETRY_MAX_S = 0.5, 60.0
CONFLICT_RETRY_S = 2.0
# A job's status is written at most this often unless its phase changes: while its pods start, a job passes
# through several short-lived states (pods not created, pending, scheduled, ready), and writing each costs
# the API server a write and every watcher an event. The last state is written when the interval is over.
STATUS_INTERVAL_S = 2.0
# Status writes are parked for this long after each MPIJob the operator creates: in a burst of new jobs a
# status PATCH (6-9 ms of API server CPU) competes with the creations the users wait for, so the statuses
# are written once the burst pauses (or after the work queue's longest park, 30 s, in a steady stream).
CREATION_HOLD_S = 1.0


@dataclass
class OperatorConfig:
    """Operator-wide settings (CLI flags / environment)."""

    mlflow_tracking_uri: str | None = None
    mlflow_credentials: MlflowCredentials | None = None
    """Given to every trainer pod (envFrom), when the tracking server wants credentials."""


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@dataclass
class TrainingJobs:
    """The TrainingJobs the operator watches, by (namespace, name), as their last event showed them."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _bodies: dict[Key, Obj] = field(default_factory=dict)

    def put(self, body: Obj) -> Key:
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        # Neither managedFields nor kubectl's copy of the applied spec is read, and together they are
        # larger than the rest of a job: at 10,000 jobs they would be most of the operator's memory.
        slim_meta = {k: v for k, v in meta.items() if k != "managedFields"}
        annotations = meta.get("annotations") or {}
        if LAST_APPLIED in annotations:
            slim_meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
        slim = {**body, "metadata": slim_meta}
        with self._lock:
            self._bodies[key] = slim
        return key

    def get(self, key: Key) -> Obj | None:
        with self._lock:
            return self._bodies.get(key)

    def drop(self, key: Key) -> Obj | None:
        with self._lock:
            return self._bodies.pop(key, None)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._bodies)

    def __len__(self) -> int:
        with self._lock:
            return len(self._bodies)


@dataclass
class Reconciler:
    cluster: Cluster
    config: OperatorConfig
    jobs: TrainingJobs = field(default_factory=TrainingJobs)
    mpijobs: Cache = field(default_factory=Cache)
    pods: Cache = field(default_factory=Cache)
    events: Cache = field(default_factory=Cache)
    """Warning events that say why a job's pods are not created or do not start (pod_events)."""
    queue: WorkQueue[Key] = field(default_factory=WorkQueue)
    leading: threading.Event = field(default_factory=threading.Event)
    budget: WriteBudget = field(default_factory=WriteBudget)
    """Status writes of all jobs together (MPIJob creation is never held back by it)."""
    _slots: dict[Key, float] = field(default_factory=dict)
    """Jobs waiting for their reserved status write: the monotonic time of the slot."""
    _tracking: dict[str, Tracking] = field(default_factory=dict)
    _deleted: dict[Key, Obj] = field(default_factory=dict)
    _failures: dict[Key, int] = field(default_factory=dict)
    _written: dict[Key, float] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    # ---- inputs -----------------------------------------------------------------------------------

    def trainingjob_event(self, kind: str | None, body: Obj) -> None:
        """A TrainingJob was listed, added, changed or deleted."""
        if kind == "DELETED":
            meta = body["metadata"]
            key = (str(meta["namespace"]), str(meta["name"]))
            self.jobs.drop(key)
            with self._guard:
                self._deleted[key] = body
        else:
            key = self.jobs.put(body)
        # A job that has no MPIJob yet and has not ended goes first (it has nothing running to report).
        urgent = not self.mpijobs.get(key) and not is_terminal(body.get("status"))
        self.queue.add(key, urgent=urgent)

    def child_changed(self, key: Key) -> None:
        """An MPIJob or pod of the job changed (informer callback)."""
        self.queue.add(key)

    def start_leading(self) -> None:
        self.leading.set()
        for key in self.jobs.keys():  # noqa: SIM118 (a locked copy, not a dict view)
            self.queue.add(key)

    def stop_leading(self) -> None:
        self.leading.clear()

    # ---- the work loop ----------------------------------------------------------------------------

    def work(self) -> None:
        """One worker thread: sync keys until the queue closes; a failing sync is retried with backoff."""
        while (key := self.queue.get()) is not None:
            try:
                if self.leading.is_set():
                    with timed("sync"):
                        self.sync(key)
                self._failures.pop(key, None)
            except Exception as exc:  # one job's failure must not stop the worker serving all others
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (failures - 1))
                expected = isinstance(exc, ApiException | mlflow_client.MlflowError | OSError)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "sync of %s/%s failed (retry in %.1fs): %s",
                    *key,
                    delay,
                    exc,
                    exc_info=not expected,
                )
                self.queue.add_after(key, delay)
            finally:
                self.queue.done(key)

    # ---- one sync ---------------------------------------------------------------------------------

    def sync(self, key: Key) -> None:
        with self._guard:
            deleted = self._deleted.pop(key, None)
        if deleted is not None:
            self._on_deleted(deleted)
        tj = self.jobs.get(key)
        if tj is None:
            return
        meta = tj["metadata"]
        if meta.get("deletionTimestamp"):  # another finalizer holds it: its children go with it
            return
        if LEGACY_FINALIZER in (meta.get("finalizers") or []):
            self._drop_legacy_finalizer(key, tj)
            return  # the update's event brings the job back
        try:
            tj_spec = parse_spec(dict(tj["spec"]))
        except ValidationError as exc:  # the CRD schema admits only valid specs; an old object may not be
            self._write_status(key, tj, {"phase": "Failed", "reason": "InvalidSpec", "message": str(exc)})
            return
        now = datetime.now(UTC)
        mpijob = self._owned_mpijob(key, tj)
        terminal = is_terminal(tj.get("status"))
        if mpijob is None and not terminal:
            mpijob = self._create_mpijob(key, tj, tj_spec)
            if mpijob is None:
                return
        if mpijob is not None and not terminal:
            suspend = tj_spec.runPolicy.suspend
            if mpijob["spec"]["runPolicy"]["suspend"] != suspend:
                self._set_suspended(key, suspend)
        self._sync_status(key, tj, tj_spec, mpijob, now)

    def _owned_mpijob(self, key: Key, tj: Obj) -> Obj | None:
        uid = tj["metadata"]["uid"]
        for mpijob in self.mpijobs.get(key):
            owners = [ref.get("uid") for ref in mpijob["metadata"].get("ownerReferences") or []]
            if uid in owners:
                return mpijob
        return None

    def _create_mpijob(self, key: Key, tj: Obj, tj_spec: TrainingJobSpec) -> Obj | None:
        """Create the MPIJob (again, if someone deleted it); None when it cannot exist now."""
        meta = tj["metadata"]
        mpijob = self.build(tj, tj_spec)
        mpijob["metadata"]["ownerReferences"] = [
            {
                "apiVersion": tj["apiVersion"],
                "kind": tj["kind"],
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        try:
            created = trim_mpijob(self.cluster.create_mpijob(mpijob))
        except ApiException as exc:
            if namespace_terminating(exc):  # the job goes with its namespace: nothing to start
                return None
            if exc.status != 409:
                raise
            # A deleted job's MPIJob of the same name, still being removed: try again shortly.
            log.info("MPIJob %s/%s exists and is not this job's; retrying", *key)
            self.queue.add_after(key, CONFLICT_RETRY_S)
            return None
        log.info("created MPIJob %s in namespace %s", created["metadata"]["name"], key[0])
        self.queue.hold(CREATION_HOLD_S)
        self.mpijobs.upsert(key, created["metadata"]["name"], created)  # until its watch event arrives
        return created

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

    def _set_suspended(self, key: Key, suspended: bool) -> None:
        try:
            self.cluster.patch_mpijob(
                key[0], names.mpijob_name(key[1]), {"spec": {"runPolicy": {"suspend": suspended}}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _drop_legacy_finalizer(self, key: Key, tj: Obj) -> None:
        meta = tj["metadata"]
        kept = [f for f in meta.get("finalizers") or [] if f != LEGACY_FINALIZER]
        try:
            self.cluster.set_finalizers(key[0], key[1], kept, str(meta["resourceVersion"]))
        except ApiException as exc:
            if exc.status not in {404, 409}:  # 409: changed meanwhile; its event queues it again
                raise

    def _sync_status(
        self, key: Key, tj: Obj, tj_spec: TrainingJobSpec, mpijob: Obj | None, now: datetime
    ) -> None:
        namespace = key[0]
        meta = tj["metadata"]
        previous = previous_status(tj)
        pods = self.pods.get(key)
        events = self.events.get(key)
        with self._guard:
            tracking = self._tracking.get(meta["uid"])
        status = compute_status(tj, tj_spec, mpijob, pods, events, now, tracking)
        if status.phase in {"Pending", "Failed"} and status.reason in {"Starting", "NotStarted"}:
            status = self._with_scheduling_events(
                key, tj, tj_spec, mpijob, pods, events, now, tracking, status
            )
        newly_terminal = is_terminal(status.as_patch()) and not is_terminal(tj.get("status"))
        if newly_terminal:
            final = self._find_tracking(tj, tj_spec)
            if final is not None:
                tracking = final
                status = compute_status(tj, tj_spec, mpijob, pods, events, now, tracking)
        tail_pod = log_tail_pod(tj_spec, previous, status)
        if tail_pod is not None and status.diagnosis is not None:  # only for jobs that opt in
            lines = tj_spec.diagnostics.logTailLines
            tail = self.cluster.pod_log_tail(namespace, tail_pod, names.TRAINER_CONTAINER, lines)
            status.diagnosis = status.diagnosis.model_copy(update={"logTail": tail})
        self._write_status(key, tj, status.as_patch())
        if newly_terminal:
            self._on_terminal(tj, tj_spec, status)
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
        self._schedule(key, tj, tj_spec, previous, status, now)

    def _with_scheduling_events(
        self,
        key: Key,
        tj: Obj,
        tj_spec: TrainingJobSpec,
        mpijob: Obj | None,
        pods: list[Obj],
        known: list[Obj],
        now: datetime,
        tracking: Tracking | None,
        status: TrainingJobStatus,
    ) -> TrainingJobStatus:
        """Read FailedScheduling events of pods the scheduler left unexplained for a few seconds."""
        waiting = {p["metadata"]["name"]: p for p in pods}
        due: list[str] = []
        later: list[str] = []
        for pod in unscheduled_pods(pods)[:MAX_EVENT_LOOKUPS]:
            created = parse_time(waiting[pod]["metadata"].get("creationTimestamp"))
            age = (now - created).total_seconds() if created is not None else EVENT_LOOKUP_AFTER_S
            (due if age >= EVENT_LOOKUP_AFTER_S else later).append(pod)
        if later:
            self.queue.add_after(key, EVENT_LOOKUP_AFTER_S)
        events = [event for pod in due for event in self.cluster.list_scheduling_events(key[0], pod)]
        if not events:
            return status
        return compute_status(tj, tj_spec, mpijob, pods, [*known, *events], now, tracking)

    def _write_status(self, key: Key, tj: Obj, new: Obj) -> None:
        old = tj.get("status") or {}
        patch = merge_patch(old, new)
        if not patch:
            self._release_slot(key)
            return
        now = time.monotonic()
        since = now - self._written.get(key, float("-inf"))
        if new.get("phase") == old.get("phase") and since < STATUS_INTERVAL_S:
            self.queue.add_after(key, STATUS_INTERVAL_S - since)  # the state then, not every one between
            return
        with self._guard:
            reserved = key in self._slots
        # New jobs are arriving: their MPIJobs first. A job that holds a reserved slot passed this already.
        if not reserved and self.queue.park_if_held(key):
            return
        if not self._take_slot(key, now):
            return
        self._written[key] = now
        metrics.STATUS_WRITES.inc()
        try:
            stored = self.cluster.patch_trainingjob_status(key[0], key[1], patch)
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile
                return
            raise
        if self.jobs.get(key) is not None:
            self.jobs.put(stored)  # the next sync starts from what was written, not from the older event

    def _take_slot(self, key: Key, now: float) -> bool:
        """Whether the job may write its status now; if not, its sync is queued for its reserved slot."""
        with self._guard:
            slot = self._slots.get(key)
            if slot is not None:  # reserved earlier: an event's sync before the slot leaves it to the slot's
                if slot > now:
                    return False
                del self._slots[key]
                return True
            wait = self.budget.reserve()
            if wait <= 0:
                return True
            self._slots[key] = now + wait
        self.queue.add_after(key, wait)
        return False

    def _release_slot(self, key: Key) -> None:
        with self._guard:
            held = self._slots.pop(key, None) is not None
        if held:
            self.budget.cancel()

    def _schedule(
        self,
        key: Key,
        tj: Obj,
        tj_spec: TrainingJobSpec,
        previous: TrainingJobStatus,
        status: TrainingJobStatus,
        now: datetime,
    ) -> None:
        """Queue the job again for the next deadline no event announces: its pending timeout or its TTL."""
        timeout = tj_spec.pendingTimeoutSeconds
        if status.phase == "Pending" and timeout:
            since = pending_since(tj, previous) or now
            due = since + timedelta(seconds=timeout, milliseconds=500)
            self.queue.add_after(key, (due - now).total_seconds())
        ttl = tj_spec.runPolicy.ttlSecondsAfterFinished
        finished = parse_time(status.completionTime)
        if ttl is not None and status.phase in {"Succeeded", "Failed"} and finished is not None:
            due = finished + timedelta(seconds=ttl)
            if now >= due:
                meta = tj["metadata"]
                log.info("deleting %s/%s: finished %ss ago (ttlSecondsAfterFinished)", *key, ttl)
                self.cluster.delete_trainingjob(meta["namespace"], meta["name"])
            else:
                self.queue.add_after(key, (due - now).total_seconds())

    # ---- MLflow -----------------------------------------------------------------------------------

    def _tracking_uri(self, tj_spec: TrainingJobSpec) -> str | None:
        return tj_spec.mlflow.trackingUri or self.config.mlflow_tracking_uri

    def _with_alias(self, tracking: Tracking, tj_spec: TrainingJobSpec) -> Tracking:
        if tracking.registered_model is None:
            return tracking
        registered = tracking.registered_model.model_copy(update={"alias": tj_spec.mlflow.alias})
        return Tracking(tracking.mlflow, tracking.progress, registered)

    def _find_tracking(self, tj: Obj, tj_spec: TrainingJobSpec) -> Tracking | None:
        """One job's run, read when the job ends (its final metrics and registered model)."""
        uri = self._tracking_uri(tj_spec)
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
        return self._with_alias(mlflow_client.tracking_from_run(uri, run, epochs), tj_spec)

    def poll_progress_when_leading(self) -> None:
        if self.leading.is_set():
            self.poll_progress()

    def poll_progress(self) -> None:
        """Progress of every running job: one MLflow search per (server, experiment); changed jobs queued."""
        groups: dict[tuple[str, str], list[tuple[Key, str, TrainingJobSpec]]] = {}
        for key in self.jobs.keys():  # noqa: SIM118 (a locked copy, not a dict view)
            tj = self.jobs.get(key)
            if tj is None or (tj.get("status") or {}).get("phase") != "Running":
                continue
            try:
                tj_spec = parse_spec(dict(tj["spec"]))
            except ValidationError:
                continue
            uri = self._tracking_uri(tj_spec)
            if uri:
                groups.setdefault((uri, tj_spec.mlflow.experiment), []).append(
                    (key, tj["metadata"]["uid"], tj_spec)
                )
        for (uri, experiment), members in groups.items():
            try:
                runs = mlflow_client.running_runs_by_job(uri, experiment)
            except mlflow_client.MlflowError as exc:
                log.warning("MLflow unavailable (%s, experiment %s): %s", uri, experiment, exc)
                continue
            for key, uid, tj_spec in members:
                run = runs.get(uid)
                if run is None:
                    continue
                epochs = effective_training(tj_spec).get("train", {}).get("epochs")
                tracking = self._with_alias(mlflow_client.tracking_from_run(uri, run, epochs), tj_spec)
                with self._guard:
                    changed = self._tracking.get(uid) != tracking
                    self._tracking[uid] = tracking
                if changed:
                    self.queue.add(key)

    # ---- terminal and deleted jobs ----------------------------------------------------------------

    def _on_terminal(self, tj: Obj, tj_spec: TrainingJobSpec, status: TrainingJobStatus) -> None:
        """Side effects of a job ending: stop unstarted pods on a pending timeout, close the MLflow run."""
        meta = tj["metadata"]
        timed_out = any(c.type == "Failed" and c.reason == PENDING_TIMEOUT_REASON for c in status.conditions)
        if timed_out:
            # Pending pods would start later if kept: a suspended MPIJob has its pods deleted.
            self._set_suspended((meta["namespace"], meta["name"]), True)
        uri = self._tracking_uri(tj_spec)
        if status.phase == "Failed" and uri and status.mlflow.runId and status.mlflow.runStatus == "RUNNING":
            try:
                mlflow_client.end_run(uri, status.mlflow.runId, "FAILED")
            except mlflow_client.MlflowError as exc:
                log.warning("could not mark MLflow run %s failed: %s", status.mlflow.runId, exc)
        with self._guard:
            self._tracking.pop(meta["uid"], None)

    def _on_deleted(self, body: Obj) -> None:
        """Mark the job's MLflow run killed if it still runs (its MPIJob goes by its owner reference)."""
        meta, status = body["metadata"], body.get("status") or {}
        with self._guard:
            self._tracking.pop(meta["uid"], None)
        key = (str(meta["namespace"]), str(meta["name"]))
        self._written.pop(key, None)
        self._release_slot(key)
        metrics.forget_job(meta["uid"])
        if is_terminal(status):
            return
        try:
            tj_spec = parse_spec(dict(body["spec"]))
        except ValidationError:
            return
        uri = self._tracking_uri(tj_spec)
        if not uri:
            return
        run_id = (status.get("mlflow") or {}).get("runId")
        try:
            if not run_id:
                run = mlflow_client.find_run(uri, tj_spec.mlflow.experiment, meta["uid"])
                running = run is not None and run["info"]["status"] == "RUNNING"
                run_id = run["info"]["run_id"] if run is not None and running else None
            if run_id:
                mlflow_client.end_run(uri, run_id, "KILLED")
        except mlflow_client.MlflowError as exc:
            log.warning("could not mark the MLflow run of deleted %s killed: %s", meta["name"], exc)


def namespace_terminating(exc: ApiException) -> bool:
    """The API server refuses new objects in a namespace being deleted (403, cause NamespaceTerminating)."""
    return exc.status == 403 and "NamespaceTerminating" in str(exc.body or "")


def run_every(interval: float, stop: threading.Event, action: Any, name: str) -> threading.Thread:
    """Call ``action()`` every ``interval`` seconds on a daemon thread until ``stop`` is set."""

    def loop() -> None:
        while not stop.wait(interval):
            try:
                action()
            except Exception:  # a loop that dies silently would stop progress for every job
                log.exception("%s failed", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


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
