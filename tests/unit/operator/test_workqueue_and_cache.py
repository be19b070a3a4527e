"""The reconciler's work queue (one entry per job, never two workers on one job, deadlines) and its caches."""

from __future__ import annotations

import threading
import time
from typing import Any

from fieldkube.operator.informer import Cache, job_key, trim_mpijob, trim_pod
from fieldkube.operator.names import JOB_LABEL, MPI_ROLE_LABEL
from fieldkube.operator.reconcile import LAST_APPLIED, TrainingJobs
from fieldkube.operator.workqueue import WorkQueue


def test_a_key_added_many_times_is_synced_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert queue.get() == "a"
    assert queue.get() == "b"
    assert len(queue) == 0


def test_a_key_added_while_a_worker_holds_it_waits_for_that_worker() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert queue.get() == "a"
    queue.add("a")  # an event arrives while "a" syncs
    queue.add("b")
    assert queue.get() == "b"  # a second worker gets the other job, not "a" again
    assert len(queue) == 0
    queue.done("a")
    assert queue.get() == "a"  # synced once more after the first sync ended


def test_a_parked_key_waits_until_no_urgent_key_does() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("new-1", urgent=True)
    queue.add("new-2", urgent=True)
    assert queue.holding()
    assert queue.park_if_held("status")  # a status write while new jobs wait for their MPIJobs
    queue.add("other")
    assert queue.get() == "new-1"
    assert queue.get() == "new-2"
    assert not queue.holding()
    assert [queue.get(), queue.get()] == ["other", "status"]
    assert not queue.park_if_held("again")  # nothing holds: the write goes on


def test_a_hold_keeps_parked_keys_until_it_ends() -> None:
    queue: WorkQueue[str] = WorkQueue()
    start = time.monotonic()
    queue.hold(0.3)  # an MPIJob was just created
    assert queue.park_if_held("status")
    queue.add("event")
    assert queue.get() == "event"  # other work goes on meanwhile
    queue.hold(0.2)  # a later creation extends the hold only if it ends later
    assert queue.get() == "status"
    assert time.monotonic() - start >= 0.3


def test_a_key_parked_longer_than_the_limit_is_served_under_a_lasting_hold() -> None:
    queue: WorkQueue[str] = WorkQueue(max_park_s=0.3)
    start = time.monotonic()
    queue.hold(60)  # new jobs keep arriving
    assert queue.park_if_held("status")
    queue.hold(60)
    assert queue.park_if_held("second")  # parked later: released with the first
    assert sorted([queue.get(), queue.get()]) == ["second", "status"]
    assert 0.3 <= time.monotonic() - start < 5
    assert queue.holding()  # the hold itself lasts
    assert not queue.park_if_held("status")  # but a released key writes, once, instead of parking again
    assert queue.park_if_held("status")  # its next write waits like any other
    assert queue.park_if_held("third")


def test_deadlines_come_due_in_order_and_not_before() -> None:
    queue: WorkQueue[str] = WorkQueue()
    start = time.monotonic()
    queue.add_after("late", 0.4)
    queue.add_after("early", 0.2)
    queue.add_after("now", 0)
    assert queue.get() == "now"
    assert queue.get() == "early"
    assert time.monotonic() - start >= 0.2
    assert queue.get() == "late"
    assert time.monotonic() - start >= 0.4


def test_closing_wakes_every_waiting_worker() -> None:
    queue: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    workers = [threading.Thread(target=lambda: got.append(queue.get())) for _ in range(3)]
    for worker in workers:
        worker.start()
    queue.close()
    for worker in workers:
        worker.join(timeout=5)
    assert got == [None, None, None]


def full_pod(name: str, job: str = "flowers") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "labels": {JOB_LABEL: job, MPI_ROLE_LABEL: "worker"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            "uid": "u1",
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "trainer", "image": "x", "env": []}]},
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "low on memory",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137}}}],
            "podIP": "10.0.0.1",
        },
    }


def test_trimmed_objects_keep_what_the_status_reads_and_drop_the_rest() -> None:
    pod = trim_pod(full_pod("flowers-worker-0"))
    assert pod["status"]["reason"] == "Evicted"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert pod["spec"] == {"nodeName": "node-1"}
    assert "managedFields" not in pod["metadata"] and "podIP" not in pod["status"]
    mpijob = trim_mpijob(
        {
            "metadata": {"name": "flowers", "namespace": "team-a", "ownerReferences": [{"uid": "tj"}]},
            "spec": {"runPolicy": {"suspend": True}, "mpiReplicaSpecs": {"Worker": {"replicas": 64}}},
            "status": {"conditions": [{"type": "Running", "status": "True"}]},
        }
    )
    assert mpijob["spec"] == {"runPolicy": {"suspend": True}}
    assert mpijob["metadata"]["ownerReferences"] == [{"uid": "tj"}]
    assert job_key(full_pod("x")) == ("team-a", "flowers")
    assert job_key({"metadata": {"name": "y", "namespace": "n", "labels": {}}}) is None


def test_a_relist_reports_the_jobs_whose_objects_changed_or_went() -> None:
    cache = Cache()
    cache.upsert(("a", "one"), "p1", {"v": 1})
    cache.upsert(("a", "two"), "p2", {"v": 1})
    cache.upsert(("b", "three"), "p3", {"v": 1})
    # Namespace a listed again: "one" unchanged, "two" gone (deleted while the watch was down), "four" new.
    changed = cache.replace("a", {("a", "one"): {"p1": {"v": 1}}, ("a", "four"): {"p4": {"v": 1}}})
    assert changed == {("a", "two"), ("a", "four")}
    assert cache.get(("a", "two")) == []
    assert cache.get(("b", "three")) == [{"v": 1}]  # another namespace's informer owns it
    cache.remove(("a", "four"), "p4")
    assert len(cache) == 2


def test_urgent_keys_are_served_first_in_their_own_order() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("status-1")
    queue.add("status-2")
    queue.add("new-1", urgent=True)
    queue.add("new-2", urgent=True)
    queue.add("status-2", urgent=True)  # already queued: moved ahead, still once
    assert [queue.get() for _ in range(4)] == ["new-1", "new-2", "status-2", "status-1"]
    assert len(queue) == 0


def test_cached_trainingjobs_drop_managed_fields_and_the_applied_copy_only() -> None:
    jobs = TrainingJobs()
    body = {
        "metadata": {
            "name": "a",
            "namespace": "ns",
            "uid": "u",
            "finalizers": ["x"],
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {LAST_APPLIED: '{"spec": {}}', "team": "plants"},
        },
        "spec": {"workers": 2},
        "status": {"phase": "Running"},
    }
    key = jobs.put(body)
    kept = jobs.get(key)
    assert key == ("ns", "a") and kept is not None
    assert kept["metadata"] == {
        "name": "a",
        "namespace": "ns",
        "uid": "u",
        "finalizers": ["x"],
        "annotations": {"team": "plants"},
    }
    assert kept["spec"] == body["spec"] and kept["status"] == body["status"]
    assert LAST_APPLIED in body["metadata"]["annotations"]  # the event's own body is left as it was
