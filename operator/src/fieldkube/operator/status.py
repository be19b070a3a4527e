"""Pure status function: (TrainingJob, MPIJob, pods, events, tracking, logs, now) → the TrainingJob status.

Everything a user needs without reading pods: the phase mirrored from the MPIJob's conditions, why a job is
pending (an Unschedulable pod condition or FailedScheduling event), the pending timeout, and on failure the
pod, exit code and reason that explain it. Terminal phases are sticky: once Succeeded or Failed, only the
tracking fields and the generation observed may still change, so pod cleanup never erases a diagnosis.

Conditions follow the Kubernetes API conventions: one per type, each with the generation it was computed
from and a CamelCase reason even when False. Log lines appear in the status only when the job opts in
(`spec.diagnostics.logTail`); `log_tail_pod` says whose log the caller should read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from fieldkube.operator import names
from fieldkube.operator.pod_events import CREATION_REASONS, start_problem
from fieldkube.operator.spec import TrainingJobSpec
from fieldkube.operator.status_model import (
    REASON_PATTERN,
    TERMINAL_PHASES,
    Condition,
    Diagnosis,
    MlflowStatus,
    Progress,
    RegisteredModelStatus,
    TrainingJobStatus,
    WorkersStatus,
)

Obj = dict[str, Any]
PENDING_TIMEOUT_REASON = "PendingTimeout"
_REASON = re.compile(REASON_PATTERN)
_SCHEDULER_REASONS = {"Unschedulable", "SchedulerError"}
_WAITING_PROBLEMS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}


@dataclass(frozen=True)
class Tracking:
    """What the MLflow server says about the job's run (gathered by the handler, passed in)."""

    mlflow: MlflowStatus = field(default_factory=MlflowStatus)
    progress: Progress | None = None
    registered_model: RegisteredModelStatus | None = None


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def condition_reason(text: str, fallback: str) -> str:
    """`text` as a condition reason (CamelCase, e.g. 'no such pod' → 'NoSuchPod'), else `fallback`."""
    if _REASON.match(text) and len(text) <= 1024:
        return text
    camel = "".join(w[:1].upper() + w[1:] for w in re.findall(r"[A-Za-z0-9_]+", text))[:1024]
    return camel if _REASON.match(camel) else fallback


def _stored_conditions(status: Obj) -> list[Obj]:
    """Stored conditions with reasons an older operator left empty or free-form made valid."""
    fallback = condition_reason(str(status.get("phase") or ""), "Unknown")
    return [
        {**c, "reason": condition_reason(str(c.get("reason") or ""), fallback)}
        for c in status.get("conditions") or []
        if isinstance(c, dict)
    ]


def previous_status(tj: Obj) -> TrainingJobStatus:
    """The stored status, or a fresh one when absent or unreadable (e.g. written by an older operator)."""
    stored = {k: v for k, v in (tj.get("status") or {}).items() if k in TrainingJobStatus.model_fields}
    if "conditions" in stored:
        stored["conditions"] = _stored_conditions(stored)
    try:
        return TrainingJobStatus.model_validate(stored)
    except ValidationError:
        return TrainingJobStatus()


def _condition(mpijob: Obj | None, kind: str) -> Obj | None:
    for cond in ((mpijob or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _role(pod: Obj) -> str:
    return str(pod.get("metadata", {}).get("labels", {}).get(names.MPI_ROLE_LABEL, ""))


def _pod_name(pod: Obj) -> str:
    return str(pod.get("metadata", {}).get("name", ""))


def _is_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pending_reason(pods: list[Obj], events: list[Obj]) -> tuple[str, str, str] | None:
    """(reason, message, pod) for the first pod that cannot start, from pod conditions, then events.

    Events: a pod refused at creation (Pod Security, quota) or a volume that cannot be mounted
    (`pod_events`), then the scheduler's FailedScheduling.
    """
    for pod in sorted(pods, key=_pod_name):
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = cond.get("reason") or "Unschedulable"
                return reason, str(cond.get("message", "")), _pod_name(pod)
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _WAITING_PROBLEMS:
                return str(waiting["reason"]), str(waiting.get("message", "")), _pod_name(pod)
    problem = start_problem(pods, events, names.MPI_ROLE_LABEL)
    if problem is not None:
        return problem
    pod_names = {_pod_name(p) for p in pods}
    scheduling = [
        e
        for e in events
        if e.get("reason") == "FailedScheduling" and (e.get("involvedObject") or {}).get("name") in pod_names
    ]
    if scheduling:
        latest = max(scheduling, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return "Unschedulable", str(latest.get("message", "")), str(latest["involvedObject"]["name"])
    return None


def unscheduled_pods(pods: list[Obj]) -> list[str]:
    """Pods not bound to a node whose status does not say why yet (their events may)."""
    found = []
    for pod in sorted(pods, key=_pod_name):
        conditions = (pod.get("status") or {}).get("conditions") or []
        explained = any(c.get("type") == "PodScheduled" for c in conditions)
        if not (pod.get("spec") or {}).get("nodeName") and not explained:
            found.append(_pod_name(pod))
    return found


def _terminations(pod: Obj) -> list[Obj]:
    status = pod.get("status") or {}
    found = []
    for container in status.get("containerStatuses") or []:
        for key in ("state", "lastState"):
            terminated = (container.get(key) or {}).get("terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                found.append({**terminated, "container": container.get("name", "")})
                break
    return found


def failure_diagnosis(pods: list[Obj], logs: dict[str, list[str]]) -> Diagnosis | None:
    """The pod that best explains a failure: OOMKilled/Evicted first, then workers, then the earliest exit."""
    candidates: list[tuple[tuple[int, int, str], Diagnosis]] = []
    for pod in pods:
        name, role, status = _pod_name(pod), _role(pod), pod.get("status") or {}
        if status.get("reason") == "Evicted":
            diagnosis = Diagnosis(
                pod=name,
                role=role,
                reason="Evicted",
                message=str(status.get("message", "")),
                logTail=logs.get(name, []),
            )
            candidates.append(((0, 0, ""), diagnosis))
            continue
        for term in _terminations(pod):
            reason = str(term.get("reason") or "Error")
            diagnosis = Diagnosis(
                pod=name,
                role=role,
                container=str(term["container"]),
                exitCode=int(term.get("exitCode", 0)),
                reason=reason,
                message=str(term.get("message", "")),
                logTail=logs.get(name, []),
            )
            rank = (
                0 if reason == "OOMKilled" else 1,
                0 if role == "worker" else 1,
                str(term.get("finishedAt", "")),
            )
            candidates.append((rank, diagnosis))
    if not candidates:
        return None
    return min(candidates, key=lambda item: item[0])[1]


def _set_condition(
    conditions: list[Condition],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Replace one condition, keeping its transition time when its status did not change."""
    text: Literal["True", "False"] = "True" if status else "False"
    previous = next((c for c in conditions if c.type == kind), None)
    since = previous.lastTransitionTime if previous is not None and previous.status == text else now
    updated = Condition(
        type=kind,
        status=text,
        observedGeneration=generation,
        reason=condition_reason(reason, kind + ("" if status else "False")),
        message=message,
        lastTransitionTime=since,
    )
    return [*(c for c in conditions if c.type != kind), updated]


def _is_scheduled(pod: Obj) -> bool:
    if (pod.get("spec") or {}).get("nodeName"):
        return True
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in conditions)


def scheduled_condition(
    spec: TrainingJobSpec, phase: str, pods: list[Obj], stuck: tuple[str, str, str] | None
) -> tuple[bool, str, str]:
    """(status, reason, message) of Scheduled: True only once every worker pod exists on a node.

    The launcher is counted when it exists (it is created once the workers are ready).
    """
    if stuck is not None and stuck[0] in _SCHEDULER_REASONS | CREATION_REASONS:
        return False, stuck[0], f"{stuck[2]}: {stuck[1]}"
    if phase == "Suspended":
        return False, "Suspended", "the job is suspended: its pods are deleted"
    if not pods:
        return False, "PodsNotCreated", "no pod of the job exists yet"
    placed = sum(1 for p in pods if _role(p) == "worker" and _is_scheduled(p))
    launcher_waits = any(_role(p) == "launcher" and not _is_scheduled(p) for p in pods)
    message = f"{placed}/{spec.workers} worker pods on nodes"
    if placed >= spec.workers and not launcher_waits:
        return True, "PodsScheduled", message
    return False, "PodsPending", message + ("; the launcher is not yet on a node" if launcher_waits else "")


def _without_tail(diagnosis: Diagnosis | None) -> Diagnosis | None:
    return None if diagnosis is None else diagnosis.model_copy(update={"logTail": []})


def _log_tail_policy(spec: TrainingJobSpec, previous: TrainingJobStatus, status: TrainingJobStatus) -> None:
    """Log lines only when the job opts in; a diagnosis that did not change keeps the tail already read."""
    diagnosis = status.diagnosis
    if diagnosis is None:
        return
    if not spec.diagnostics.logTail:
        if diagnosis.logTail:
            status.diagnosis = _without_tail(diagnosis)
        return
    kept = previous.diagnosis
    if not diagnosis.logTail and kept is not None and kept.logTail and _without_tail(kept) == diagnosis:
        status.diagnosis = kept


def log_tail_pod(spec: TrainingJobSpec, previous: TrainingJobStatus, status: TrainingJobStatus) -> str | None:
    """The pod whose log tail the caller should read into `status.diagnosis.logTail` now, if any.

    Only for jobs that opt in (`spec.diagnostics.logTail`, `spec.diagnostics.logTailLines` lines), and only
    for a diagnosis that names a pod, has no tail yet and is new since `previous`, so an unchanged failure
    costs no log read on later syncs.
    """
    diagnosis = status.diagnosis
    if not spec.diagnostics.logTail or diagnosis is None or not diagnosis.pod or diagnosis.logTail:
        return None
    if previous.diagnosis is not None and _without_tail(previous.diagnosis) == diagnosis:
        return None
    return diagnosis.pod


def _progress_summary(phase: str, progress: Progress) -> str:
    if phase == "Succeeded":
        return "100%"
    parts = []
    if progress.epoch is not None:
        epoch = int(progress.epoch) if float(progress.epoch).is_integer() else round(progress.epoch, 1)
        parts.append(f"epoch {epoch}/{progress.epochs}" if progress.epochs else f"epoch {epoch}")
    if progress.percent is not None:
        parts.append(f"{progress.percent:.0f}%")
    return " ".join(parts)


def pending_since(tj: Obj, previous: TrainingJobStatus) -> datetime | None:
    """Creation, or the last resume (a suspended job is not pending)."""
    created = parse_time(tj.get("metadata", {}).get("creationTimestamp"))
    resumed = next(
        (
            parse_time(c.lastTransitionTime)
            for c in previous.conditions
            if c.type == "Suspended" and c.status == "False"
        ),
        None,
    )
    candidates = [t for t in (created, resumed) if t is not None]
    return max(candidates) if candidates else None


def compute_status(
    tj: Obj,
    spec: TrainingJobSpec,
    mpijob: Obj | None,
    pods: list[Obj],
    events: list[Obj],
    now: datetime,
    tracking: Tracking | None = None,
    logs: dict[str, list[str]] | None = None,
) -> TrainingJobStatus:
    """The status the TrainingJob should have now, given what the cluster and MLflow report."""
    previous = previous_status(tj)
    logs = (logs or {}) if spec.diagnostics.logTail else {}
    stamp = timestamp(now)
    status = previous.model_copy(deep=True)
    if tracking is not None:
        status.mlflow = tracking.mlflow
        if tracking.progress is not None:
            status.progress = tracking.progress
        if tracking.registered_model is not None:
            status.registeredModel = tracking.registered_model
    status.progress.summary = _progress_summary(status.phase, status.progress)
    generation = tj.get("metadata", {}).get("generation")
    if previous.phase in TERMINAL_PHASES:
        # an edit after the end (TTL, diagnostics) changes nothing the conditions say: they now describe it
        status.observedGeneration = generation
        status.conditions = [
            c.model_copy(update={"observedGeneration": generation}) for c in status.conditions
        ]
        _log_tail_policy(spec, previous, status)
        return status

    status.observedGeneration = generation
    status.gpus = spec.total_gpus
    workers = [p for p in pods if _role(p) == "worker"]
    status.workers = WorkersStatus(ready=sum(1 for p in workers if _is_ready(p)), total=spec.workers)
    conditions = list(previous.conditions)
    if mpijob is not None:
        status.mpiJobName = mpijob["metadata"]["name"]
        created = (True, "MPIJobCreated", f"MPIJob {status.mpiJobName}")
    elif any(c.type == "Created" and c.status == "True" for c in conditions):
        created = (False, "MPIJobMissing", f"MPIJob {names.mpijob_name(tj['metadata']['name'])} is gone")
    else:
        created = (False, "MPIJobNotCreated", "creating the MPIJob")
    conditions = _set_condition(conditions, "Created", *created, stamp, generation)
    mpi_status = (mpijob or {}).get("status") or {}

    failed, succeeded = _condition(mpijob, "Failed"), _condition(mpijob, "Succeeded")
    running, suspended = _condition(mpijob, "Running"), _condition(mpijob, "Suspended")
    diagnosis = failure_diagnosis(pods, logs)
    stuck = pending_reason(pods, events)
    status.reason, status.message = "", ""

    if failed is not None:
        status.phase = "Failed"
        status.reason = str(failed.get("reason") or "Failed")
        status.message = str(failed.get("message", ""))
        status.diagnosis = (
            diagnosis or previous.diagnosis or Diagnosis(pod="", reason=status.reason, message=status.message)
        )
        if diagnosis is not None:
            status.reason = diagnosis.reason
        status.startTime = status.startTime or mpi_status.get("startTime")
        status.completionTime = mpi_status.get("completionTime") or stamp
    elif succeeded is not None:
        status.phase = "Succeeded"
        status.reason = "Succeeded"
        status.message = str(succeeded.get("message", ""))
        status.diagnosis = None
        # a job can finish between two syncs (or while the operator restarts): the MPIJob knows its start
        status.startTime = status.startTime or mpi_status.get("startTime")
        status.completionTime = mpi_status.get("completionTime") or stamp
    elif spec.runPolicy.suspend or suspended is not None:
        status.phase = "Suspended"
        status.reason = "Suspended"
    elif running is not None:
        status.phase = "Running"
        status.startTime = status.startTime or running.get("lastTransitionTime") or stamp
        status.diagnosis = diagnosis
    else:
        status.phase = "Pending"
        status.diagnosis = diagnosis
        if stuck is not None:
            status.reason, status.message = stuck[0], f"{stuck[2]}: {stuck[1]}"
        elif mpijob is None:
            status.reason, status.message = "Creating", "creating the MPIJob"
        else:
            status.reason, status.message = "Starting", "waiting for the workers and the launcher to start"
        since = pending_since(tj, previous)
        timeout = spec.pendingTimeoutSeconds
        if timeout and since is not None and (now - since).total_seconds() > timeout:
            why = status.reason if stuck is not None else "NotStarted"
            status.phase = "Failed"
            status.message = f"still pending after {timeout}s (pendingTimeoutSeconds): {status.message}"
            status.reason = why
            status.completionTime = stamp
            status.diagnosis = Diagnosis(
                pod=stuck[2] if stuck else "", reason=why, message=stuck[1] if stuck else "pods did not start"
            )
            conditions = _set_condition(
                conditions, "Failed", True, PENDING_TIMEOUT_REASON, status.message, stamp, generation
            )

    previous_scheduled = next((c for c in conditions if c.type == "Scheduled"), None)
    if not (status.phase in TERMINAL_PHASES and not pods and previous_scheduled is not None):
        # a finished job's pods may be cleaned up: that does not unschedule it
        scheduled = scheduled_condition(spec, status.phase, pods, stuck)
        conditions = _set_condition(conditions, "Scheduled", *scheduled, stamp, generation)
    for kind in ("Running", "Succeeded", "Suspended"):
        conditions = _set_condition(
            conditions, kind, status.phase == kind, status.phase, status.message, stamp, generation
        )
    failed_now = any(c.type == "Failed" and c.status == "True" for c in conditions)
    if status.phase == "Failed" and not failed_now:
        conditions = _set_condition(
            conditions, "Failed", True, status.reason or "Failed", status.message, stamp, generation
        )
    elif status.phase != "Failed":
        conditions = _set_condition(conditions, "Failed", False, status.phase, "", stamp, generation)
    status.conditions = conditions
    _log_tail_policy(spec, previous, status)
    status.progress.summary = _progress_summary(status.phase, status.progress)
    return status


def is_terminal(status: dict[str, Any] | None) -> bool:
    return bool(status) and (status or {}).get("phase") in TERMINAL_PHASES
