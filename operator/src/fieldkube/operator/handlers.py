"""kopf wiring, kept thin: kopf watches the TrainingJobs; everything else is the reconciler's.

One event handler feeds each TrainingJob event to the reconciler's queue; kopf writes nothing to the
objects (no finalizer, no annotations), so with the operator stopped or uninstalled a TrainingJob and its
namespace still delete at once (the MPIJob follows by its owner reference). On startup: the MPIJob and pod
watches (server-side label selector), the Warning events watch, the worker threads, the MLflow progress
loop and, unless standalone, the Lease election that lets only one replica act.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import kopf

from fieldkube.operator import metrics, spec
from fieldkube.operator.informer import Informer, event_key, trim_event, trim_mpijob, trim_pod
from fieldkube.operator.kube import Cluster, load_config
from fieldkube.operator.leader import LeaderElector
from fieldkube.operator.mpijob_builder import MlflowCredentials
from fieldkube.operator.reconcile import OperatorConfig, Reconciler, run_every
from fieldkube.operator.workqueue import DEFAULT_WORKERS
from fieldkube.operator.write_budget import DEFAULT_WRITES_PER_SECOND, WriteBudget

TJ = (spec.GROUP, spec.VERSION, spec.PLURAL)
PROGRESS_INTERVAL_S = float(os.environ.get("FIELDKUBE_SYNC_INTERVAL_SECONDS", "10"))
INFORMER_SYNC_TIMEOUT_S = 120.0
USER_AGENT = f"fieldkube-operator/{importlib.metadata.version('fieldkube-operator')}"


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: this operator registers no change handlers (create, update, delete), only an event
    handler, so the diff kopf computes on every event is never read. kopf's default builds its base by
    deep-copying the whole object (managedFields included) on every event: in a burst of 1,000 new jobs,
    with the handler's own copy, a sixth of the operator's CPU."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@dataclass
class Controller:
    reconciler: Reconciler
    informers: list[Informer] = field(default_factory=list)
    elector: LeaderElector | None = None
    stop: threading.Event = field(default_factory=threading.Event)


_controller: Controller | None = None


def _namespaces() -> list[str | None]:
    watched = [n for n in os.environ.get("FIELDKUBE_NAMESPACES", "").split(",") if n]
    return list(watched) or [None]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """Caches filled before the first TrainingJob event, workers, progress loop, election, /metrics."""
    global _controller
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    secret = os.environ.get("FIELDKUBE_MLFLOW_CREDENTIALS_SECRET") or None
    env_names = os.environ.get("FIELDKUBE_MLFLOW_CREDENTIALS_ENV", "")
    config = OperatorConfig(
        mlflow_tracking_uri=os.environ.get("FIELDKUBE_MLFLOW_TRACKING_URI") or None,
        mlflow_credentials=MlflowCredentials(secret, tuple(n for n in env_names.split(",") if n))
        if secret
        else None,
    )
    # One identity per process: it holds the Lease and signs every request (the user agent), so the API
    # server's audit log tells which replica wrote what.
    identity = f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    api = load_config()
    api.user_agent = f"{USER_AGENT} ({identity})"
    cluster = Cluster(api)
    rate = float(os.environ.get("FIELDKUBE_STATUS_WRITES_PER_SECOND", str(DEFAULT_WRITES_PER_SECOND)))
    rec = Reconciler(cluster, config, budget=WriteBudget(rate))
    controller = Controller(rec)
    for namespace in _namespaces():
        controller.informers += [
            Informer(
                "mpijobs",
                cluster.mpijob_lister(namespace),
                rec.mpijobs,
                trim_mpijob,
                rec.child_changed,
                namespace,
            ),
            Informer("pods", cluster.pod_lister(namespace), rec.pods, trim_pod, rec.child_changed, namespace),
            Informer(
                "events",
                cluster.event_lister(namespace),
                rec.events,
                trim_event,
                rec.child_changed,
                namespace,
                selector={"field_selector": "type=Warning"},
                key=event_key,
            ),
        ]
    for informer in controller.informers:
        informer.start()
    for informer in controller.informers:
        # A job synced before its MPIJob is known would create that MPIJob a second time (409).
        if not informer.synced.wait(INFORMER_SYNC_TIMEOUT_S):
            raise kopf.PermanentError(f"the {informer.what} watch did not list in {INFORMER_SYNC_TIMEOUT_S}s")
    for i in range(int(os.environ.get("FIELDKUBE_WORKERS", str(DEFAULT_WORKERS)))):
        threading.Thread(target=rec.work, name=f"sync-{i}", daemon=True).start()
    run_every(PROGRESS_INTERVAL_S, controller.stop, rec.poll_progress_when_leading, "mlflow-progress")
    if os.environ.get("FIELDKUBE_LEADER_ELECTION", "1") == "0":
        rec.start_leading()
    else:
        controller.elector = LeaderElector(
            cluster.coordination,
            os.environ.get("FIELDKUBE_LEASE_NAMESPACE", "fieldkube-system"),
            os.environ.get("FIELDKUBE_LEASE_NAME", "fieldkube-operator"),
            identity,
            started=rec.start_leading,
            stopped=rec.stop_leading,
            # Shorter in tests; the renew deadline and retry period keep their ratios to it.
            lease_duration_s=(duration := int(os.environ.get("FIELDKUBE_LEASE_DURATION_SECONDS", "15"))),
            renew_deadline_s=duration * 2 / 3,
            retry_s=duration / 7.5,
        )
        controller.elector.start()
        logger.info(f"competing for the lease as {identity}")
    _controller = controller
    port = int(os.environ.get("FIELDKUBE_METRICS_PORT", "8080"))
    if port:
        metrics.serve(port, os.environ.get("FIELDKUBE_BIND_ADDRESS", "0.0.0.0"))


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    """Release the Lease first (another replica takes over at once), then stop the threads."""
    controller = _controller
    if controller is None:
        return
    if controller.elector is not None:
        controller.elector.stop()
    controller.reconciler.stop_leading()
    controller.stop.set()
    controller.reconciler.queue.close()
    for informer in controller.informers:
        informer.stop()


@kopf.on.event(*TJ)
async def trainingjob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Every TrainingJob event (the initial listing too) updates the cache and queues the job.

    The body is the event's freshly parsed object, which kopf does not change afterwards, and nothing in the
    operator changes a cached job, so a shallow copy is enough (a deep copy of every event was measurable).
    """
    if _controller is None:
        raise kopf.TemporaryError("operator not started yet", delay=1)
    _controller.reconciler.trainingjob_event(type or None, dict(body))
