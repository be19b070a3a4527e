"""Every Prometheus metric the operator exports, and the one place that records phase transitions."""

from __future__ import annotations

import threading
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fieldkube.operator.status import parse_time

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "fieldkube_operator_reconcile_total", "Reconciles by kind of handler.", ["handler"], registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "fieldkube_operator_reconcile_errors_total", "Reconciles that raised.", ["handler"], registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "fieldkube_operator_reconcile_duration_seconds",
    "Wall time of one reconcile.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STATUS_WRITES = Counter(
    "fieldkube_operator_status_writes_total",
    "TrainingJob status patches sent (a sync that changes nothing writes none).",
    registry=REGISTRY,
)
JOBS_BY_PHASE = Gauge(
    "fieldkube_trainingjobs", "TrainingJobs known to this operator, by phase.", ["phase"], registry=REGISTRY
)
TIME_TO_RUNNING = Histogram(
    "fieldkube_trainingjob_time_to_running_seconds",
    "From TrainingJob creation to Running.",
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "fieldkube_trainingjob_duration_seconds",
    "From creation to completion, by outcome.",
    ["outcome"],
    buckets=(10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400),
    registry=REGISTRY,
)
GPU_SECONDS = Counter(
    "fieldkube_trainingjob_gpu_seconds_total",
    "GPUs requested × seconds from start to completion of finished jobs.",
    ["namespace"],
    registry=REGISTRY,
)
FAILURES = Counter(
    "fieldkube_trainingjob_failures_total", "Failed TrainingJobs by reason.", ["reason"], registry=REGISTRY
)
# The reasons jobs fail with most often (status.py's diagnosis), exported at 0 from the start: a series
# that appears only at its first failure hides that failure from increase(), so from the alert on failures
# and the dashboard's failures panel. A rarer reason still starts its series at its first failure.
COMMON_FAILURE_REASONS = ("Error", "OOMKilled", "Evicted", "NotStarted", "Unschedulable", "ImagePullBackOff")
for _reason in COMMON_FAILURE_REASONS:
    FAILURES.labels(reason=_reason)

_phases: dict[str, str] = {}
_lock = threading.Lock()
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")


def _refresh_phase_gauge() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        JOBS_BY_PHASE.labels(phase=phase).set(count)


def record_phase(
    uid: str,
    namespace: str,
    old: str | None,
    new: str,
    created: str | None,
    started: str | None,
    completed: str | None,
    gpus: int,
    reason: str,
    now: datetime,
) -> None:
    """Update the gauges, and the histograms/counters when a job changes phase.

    ``old`` is the phase stored in the job's status; the phase last recorded here wins over it, so a sync
    that read a status older than its own last write counts a transition once.
    """
    with _lock:
        old = _phases.get(uid, old)
        _phases[uid] = new
        _refresh_phase_gauge()
    if old == new:
        return
    created_at = parse_time(created)
    if new == "Running" and created_at is not None:
        TIME_TO_RUNNING.observe(max(0.0, (now - created_at).total_seconds()))
    if new in {"Succeeded", "Failed"}:
        end = parse_time(completed) or now
        if created_at is not None:
            JOB_DURATION.labels(outcome=new).observe(max(0.0, (end - created_at).total_seconds()))
        start = parse_time(started)
        if start is not None and gpus:
            GPU_SECONDS.labels(namespace=namespace).inc(gpus * max(0.0, (end - start).total_seconds()))
        if new == "Failed":
            FAILURES.labels(reason=reason or "Unknown").inc()


def forget_job(uid: str) -> None:
    with _lock:
        _phases.pop(uid, None)
        _refresh_phase_gauge()


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Expose /metrics on its own port."""
    start_http_server(port, addr=address, registry=REGISTRY)
