"""The pure status function: phases mirrored from the MPIJob, pending reasons, timeouts and diagnoses."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from fieldkube.operator.names import JOB_LABEL, MPI_JOB_NAME_LABEL, MPI_ROLE_LABEL
from fieldkube.operator.spec import parse_spec
from fieldkube.operator.status import (
    Tracking,
    compute_status,
    condition_reason,
    failure_diagnosis,
    log_tail_pod,
    previous_status,
    unscheduled_pods,
)
from fieldkube.operator.status_model import (
    REASON_PATTERN,
    Condition,
    MlflowStatus,
    Progress,
    RegisteredModelStatus,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pod(name: str, role: str, phase: str = "Running", **status: Any) -> dict[str, Any]:
    conditions = status.pop("conditions", None)
    if conditions is None and phase == "Running":
        conditions = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]
    return {
        "metadata": {
            "name": name,
            "labels": {JOB_LABEL: "flowers", MPI_ROLE_LABEL: role, MPI_JOB_NAME_LABEL: "flowers"},
        },
        "status": {"phase": phase, "conditions": conditions or [], **status},
    }


def mpijob(*conditions: tuple[str, str], **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "flowers", "namespace": "team-a"},
        "status": {
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "message": f"{kind} {reason}"}
                for kind, reason in conditions
            ],
            **status,
        },
    }


def _status(tj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], **kw: Any) -> Any:
    now = kw.pop("now", T0 + timedelta(seconds=5))
    return compute_status(tj, parse_spec(tj["spec"]), job, pods, kw.pop("events", []), now, **kw)


def _unschedulable(name: str) -> dict[str, Any]:
    return pod(
        name,
        "worker",
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu.",
            }
        ],
    )


def test_a_new_job_without_mpijob_is_pending_creating(tj: dict[str, Any]) -> None:
    status = _status(tj, None, [])
    assert (status.phase, status.reason, status.gpus) == ("Pending", "Creating", 8)
    assert status.workers.total == 2 and status.observedGeneration == 1


def test_unschedulable_pods_show_the_schedulers_reason(tj: dict[str, Any]) -> None:
    status = _status(tj, mpijob(("Created", "MPIJobCreated")), [_unschedulable("flowers-worker-0")])
    assert status.phase == "Pending" and status.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in status.message and "flowers-worker-0" in status.message
    scheduled = next(c for c in status.conditions if c.type == "Scheduled")
    assert scheduled.status == "False" and scheduled.reason == "Unschedulable"


def test_failed_scheduling_events_explain_pods_without_conditions(tj: dict[str, Any]) -> None:
    event = {
        "reason": "FailedScheduling",
        "message": "0/3 nodes: insufficient nvidia.com/gpu",
        "involvedObject": {"name": "flowers-worker-1"},
        "lastTimestamp": "2026-01-01T00:00:03Z",
    }
    other = {**event, "involvedObject": {"name": "someone-else"}}
    waiting = pod("flowers-worker-1", "worker", "Pending", conditions=[])
    status = _status(tj, mpijob(("Created", "MPIJobCreated")), [waiting], events=[other, event])
    assert status.reason == "Unschedulable" and "0/3 nodes" in status.message


def test_image_pull_errors_are_shown_while_pending(tj: dict[str, Any]) -> None:
    pulling = pod(
        "flowers-worker-0",
        "worker",
        "Pending",
        conditions=[],
        containerStatuses=[
            {
                "name": "trainer",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
            }
        ],
    )
    status = _status(tj, mpijob(("Created", "MPIJobCreated")), [pulling])
    assert status.reason == "ImagePullBackOff"


def test_pending_past_the_timeout_fails_with_the_pending_reason(tj: dict[str, Any]) -> None:
    tj["spec"]["pendingTimeoutSeconds"] = 30
    pods = [_unschedulable("flowers-worker-0")]
    assert _status(tj, mpijob(), pods, now=T0 + timedelta(seconds=29)).phase == "Pending"
    status = _status(tj, mpijob(), pods, now=T0 + timedelta(seconds=31))
    assert status.phase == "Failed" and status.reason == "Unschedulable"
    assert "pendingTimeoutSeconds" in status.message and "Insufficient nvidia.com/gpu" in status.message
    assert status.diagnosis is not None and status.diagnosis.pod == "flowers-worker-0"
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert failed.status == "True" and failed.reason == "PendingTimeout"
    assert status.completionTime == "2026-01-01T00:00:31Z"


def test_zero_pending_timeout_waits_forever(tj: dict[str, Any]) -> None:
    tj["spec"]["pendingTimeoutSeconds"] = 0
    status = _status(tj, mpijob(), [_unschedulable("flowers-worker-0")], now=T0 + timedelta(days=30))
    assert status.phase == "Pending"


def test_running_counts_ready_workers_and_keeps_the_start_time(tj: dict[str, Any]) -> None:
    job = mpijob(("Running", "MPIJobRunning"))
    job["status"]["conditions"][0]["lastTransitionTime"] = "2026-01-01T00:00:04Z"
    pods = [
        pod("flowers-launcher-x", "launcher"),
        pod("flowers-worker-0", "worker"),
        pod("flowers-worker-1", "worker", "Pending", conditions=[]),
    ]
    status = _status(tj, job, pods)
    assert status.phase == "Running" and status.startTime == "2026-01-01T00:00:04Z"
    assert (status.workers.ready, status.workers.total) == (1, 2)
    running = next(c for c in status.conditions if c.type == "Running")
    tj["status"] = status.as_patch()
    later = _status(tj, job, pods, now=T0 + timedelta(seconds=60))
    assert (
        next(c for c in later.conditions if c.type == "Running").lastTransitionTime
        == running.lastTransitionTime
    )


def test_succeeded_mirrors_the_mpijob_and_clears_the_diagnosis(tj: dict[str, Any]) -> None:
    job = mpijob(
        ("Succeeded", "MPIJobSucceeded"),
        startTime="2026-01-01T00:00:02Z",
        completionTime="2026-01-01T00:10:00Z",
    )
    status = _status(tj, job, [])
    assert status.phase == "Succeeded" and status.completionTime == "2026-01-01T00:10:00Z"
    assert status.startTime == "2026-01-01T00:00:02Z"  # never seen Running: the MPIJob's start
    assert status.diagnosis is None and status.progress.summary == "100%"


def _terminated(
    name: str, role: str, code: int, reason: str, finished: str, key: str = "state"
) -> dict[str, Any]:
    return pod(
        name,
        role,
        "Failed",
        conditions=[],
        containerStatuses=[
            {
                "name": "trainer",
                key: {"terminated": {"exitCode": code, "reason": reason, "finishedAt": finished}},
            }
        ],
    )


def test_failure_names_the_worker_pod_exit_code_and_reason(tj: dict[str, Any]) -> None:
    pods = [
        _terminated("flowers-launcher-x", "launcher", 1, "Error", "2026-01-01T00:00:09Z"),
        _terminated("flowers-worker-1", "worker", 3, "Error", "2026-01-01T00:00:08Z"),
    ]
    job = mpijob(("Failed", "BackoffLimitExceeded"))
    status = _status(tj, job, pods, now=T0 + timedelta(seconds=10))
    assert status.phase == "Failed" and status.reason == "Error"
    assert status.diagnosis is not None
    assert (status.diagnosis.pod, status.diagnosis.exitCode, status.diagnosis.role) == (
        "flowers-worker-1",
        3,
        "worker",
    )


def test_oom_killed_and_evicted_pods_win_the_diagnosis() -> None:
    oom = _terminated(
        "flowers-launcher-x", "launcher", 137, "OOMKilled", "2026-01-01T00:00:09Z", key="lastState"
    )
    plain = _terminated("flowers-worker-0", "worker", 1, "Error", "2026-01-01T00:00:01Z")
    diagnosis = failure_diagnosis([plain, oom], {"flowers-launcher-x": ["killed"]})
    assert diagnosis is not None and (diagnosis.reason, diagnosis.exitCode) == ("OOMKilled", 137)
    assert diagnosis.logTail == ["killed"]
    evicted = pod(
        "flowers-worker-1", "worker", "Failed", conditions=[], reason="Evicted", message="node pressure"
    )
    diagnosis = failure_diagnosis([plain, evicted], {})
    assert diagnosis is not None and diagnosis.reason == "Evicted" and diagnosis.pod == "flowers-worker-1"
    assert failure_diagnosis([pod("flowers-worker-0", "worker")], {}) is None


def test_terminal_status_is_sticky_when_pods_are_cleaned_up(tj: dict[str, Any]) -> None:
    pods = [_terminated("flowers-worker-0", "worker", 2, "Error", "2026-01-01T00:00:08Z")]
    failed = _status(tj, mpijob(("Failed", "BackoffLimitExceeded")), pods)
    tj["status"] = failed.as_patch()
    later = _status(tj, None, [], now=T0 + timedelta(hours=1))
    assert later.as_patch() == failed.as_patch()


def test_failed_mpijob_without_pods_still_reports_its_reason(tj: dict[str, Any]) -> None:
    status = _status(tj, mpijob(("Failed", "MPIJobEvicted")), [])
    assert status.phase == "Failed" and status.reason == "MPIJobEvicted"
    assert status.diagnosis is not None and status.diagnosis.reason == "MPIJobEvicted"


def test_suspended_job_shows_suspended_and_is_not_timed_out(tj: dict[str, Any]) -> None:
    tj["spec"]["runPolicy"] = {"suspend": True}
    tj["spec"]["pendingTimeoutSeconds"] = 1
    status = _status(tj, mpijob(("Suspended", "MPIJobSuspended")), [], now=T0 + timedelta(hours=1))
    assert status.phase == "Suspended"


def test_tracking_fills_progress_run_and_registered_model(tj: dict[str, Any]) -> None:
    tracking = Tracking(
        mlflow=MlflowStatus(runId="r1", runUrl="http://m/#/experiments/1/runs/r1", runStatus="RUNNING"),
        progress=Progress(epoch=3, epochs=10, step=120, percent=30.0, loss=0.5, imagesPerSecond=80.0),
        registered_model=RegisteredModelStatus(name="fieldkube-counter", version="4", alias="candidate"),
    )
    status = _status(
        tj, mpijob(("Running", "MPIJobRunning")), [pod("flowers-worker-0", "worker")], tracking=tracking
    )
    assert status.progress.summary == "epoch 3/10 30%" and status.mlflow.runId == "r1"
    assert status.registeredModel is not None and status.registeredModel.version == "4"
    # a finished job keeps its phase but may still learn its registered model version
    tj["status"] = {**status.as_patch(), "phase": "Succeeded"}
    later = _status(tj, None, [], tracking=tracking)
    assert later.phase == "Succeeded" and later.mlflow.runId == "r1"


def test_only_pods_the_scheduler_has_not_explained_need_their_events_read() -> None:
    untouched = pod("flowers-worker-1", "worker", "Pending", conditions=[])
    bound = {**pod("flowers-worker-2", "worker", "Pending", conditions=[]), "spec": {"nodeName": "n1"}}
    assert unscheduled_pods([bound, _unschedulable("flowers-worker-0"), untouched]) == ["flowers-worker-1"]


def _scheduled_pod(name: str, role: str) -> dict[str, Any]:
    return {**pod(name, role, "Pending", conditions=[]), "spec": {"nodeName": "gpu-node-0"}}


def _by_type(status: Any) -> dict[str, Any]:
    return {c.type: c for c in status.conditions}


def test_every_condition_has_a_camel_case_reason_and_the_generation_it_was_computed_from(
    tj: dict[str, Any],
) -> None:
    tj["metadata"]["generation"] = 3
    pods = [pod("flowers-worker-0", "worker"), pod("flowers-worker-1", "worker")]
    status = _status(tj, mpijob(("Running", "MPIJobRunning")), pods)
    conditions = _by_type(status)
    assert set(conditions) == {"Created", "Scheduled", "Running", "Succeeded", "Failed", "Suspended"}
    for condition in status.conditions:
        assert re.fullmatch(REASON_PATTERN, condition.reason), condition
        assert condition.observedGeneration == 3 and condition.lastTransitionTime
    assert (conditions["Failed"].status, conditions["Failed"].reason) == ("False", "Running")
    assert (conditions["Succeeded"].status, conditions["Succeeded"].reason) == ("False", "Running")
    assert (conditions["Running"].status, conditions["Running"].reason) == ("True", "Running")


def test_a_condition_without_a_reason_is_not_a_valid_status() -> None:
    with pytest.raises(ValidationError):
        Condition(type="Failed", status="False", reason="")
    with pytest.raises(ValidationError):
        Condition(type="Failed", status="False", reason="not camel case")


def test_scheduled_is_false_until_every_worker_pod_is_on_a_node(tj: dict[str, Any]) -> None:
    job = mpijob(("Created", "MPIJobCreated"))
    before = _by_type(_status(tj, job, []))["Scheduled"]
    assert (before.status, before.reason) == ("False", "PodsNotCreated")
    one = [_scheduled_pod("flowers-worker-0", "worker"), pod("flowers-worker-1", "worker", "Pending")]
    half = _by_type(_status(tj, job, one))["Scheduled"]
    assert (half.status, half.reason, half.message) == ("False", "PodsPending", "1/2 worker pods on nodes")
    both = [_scheduled_pod("flowers-worker-0", "worker"), _scheduled_pod("flowers-worker-1", "worker")]
    placed = _by_type(_status(tj, job, both))["Scheduled"]
    assert (placed.status, placed.reason) == ("True", "PodsScheduled")
    waiting_launcher = [*both, pod("flowers-launcher-x", "launcher", "Pending", conditions=[])]
    launcher = _by_type(_status(tj, job, waiting_launcher))["Scheduled"]
    assert (launcher.status, launcher.reason) == ("False", "PodsPending") and "launcher" in launcher.message


def test_scheduled_stays_true_when_a_finished_jobs_pods_are_cleaned_up(tj: dict[str, Any]) -> None:
    both = [pod("flowers-worker-0", "worker"), pod("flowers-worker-1", "worker")]
    running = _status(tj, mpijob(("Running", "MPIJobRunning")), both)
    tj["status"] = running.as_patch()
    done = _status(tj, mpijob(("Succeeded", "MPIJobSucceeded")), [], now=T0 + timedelta(minutes=5))
    scheduled = _by_type(done)["Scheduled"]
    assert (scheduled.status, scheduled.reason) == ("True", "PodsScheduled")
    assert scheduled.lastTransitionTime == _by_type(running)["Scheduled"].lastTransitionTime


def test_a_suspended_job_is_not_scheduled(tj: dict[str, Any]) -> None:
    tj["spec"]["runPolicy"] = {"suspend": True}
    scheduled = _by_type(_status(tj, mpijob(("Suspended", "MPIJobSuspended")), []))["Scheduled"]
    assert (scheduled.status, scheduled.reason) == ("False", "Suspended")


def test_created_turns_false_when_the_mpijob_disappears(tj: dict[str, Any]) -> None:
    fresh = _by_type(_status(tj, None, []))["Created"]
    assert (fresh.status, fresh.reason) == ("False", "MPIJobNotCreated")
    tj["status"] = _status(tj, mpijob(("Created", "MPIJobCreated")), []).as_patch()
    gone = _by_type(_status(tj, None, []))["Created"]
    assert (gone.status, gone.reason) == ("False", "MPIJobMissing") and "flowers" in gone.message


def test_a_stored_status_with_empty_reasons_from_an_older_operator_is_still_read(tj: dict[str, Any]) -> None:
    old = [
        {
            "type": "Succeeded",
            "status": "True",
            "reason": "Succeeded",
            "lastTransitionTime": "2026-01-01T00:01:00Z",
        },
        {"type": "Failed", "status": "False", "reason": "", "message": ""},
        {"type": "Scheduled", "status": "False", "reason": "no pods yet", "message": ""},
    ]
    tj["status"] = {"phase": "Succeeded", "conditions": old, "completionTime": "2026-01-01T00:01:00Z"}
    read = previous_status(tj)
    assert read.phase == "Succeeded" and read.completionTime == "2026-01-01T00:01:00Z"
    assert [c.reason for c in read.conditions] == ["Succeeded", "Succeeded", "NoPodsYet"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("OOMKilled", "OOMKilled"), ("no such pod", "NoSuchPod"), ("", "Fallback"), ("137", "Fallback")],
)
def test_condition_reasons_are_made_camel_case_or_fall_back(text: str, expected: str) -> None:
    assert condition_reason(text, "Fallback") == expected


def _failed_with_logs(tj: dict[str, Any], logs: dict[str, list[str]]) -> Any:
    pods = [_terminated("flowers-worker-1", "worker", 3, "Error", "2026-01-01T00:00:08Z")]
    return _status(tj, mpijob(("Failed", "BackoffLimitExceeded")), pods, logs=logs)


def test_log_lines_reach_the_status_only_when_the_job_opts_in(tj: dict[str, Any]) -> None:
    logs = {"flowers-worker-1": ["Traceback", "ValueError: secret=hunter2"]}
    private = _failed_with_logs(tj, logs)
    assert private.diagnosis is not None and private.diagnosis.logTail == []
    assert log_tail_pod(parse_spec(tj["spec"]), previous_status(tj), private) is None
    tj["spec"]["diagnostics"] = {"logTail": True}
    shared = _failed_with_logs(tj, logs)
    assert shared.diagnosis is not None and shared.diagnosis.logTail == logs["flowers-worker-1"]


def test_log_tail_pod_names_a_new_diagnosis_once_and_an_unchanged_one_keeps_its_tail(
    tj: dict[str, Any],
) -> None:
    tj["spec"]["diagnostics"] = {"logTail": True, "logTailLines": 5}
    spec = parse_spec(tj["spec"])
    crashed = pod(
        "flowers-worker-1",
        "worker",
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=[
            {"name": "trainer", "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}
        ],
    )
    job = mpijob(("Running", "MPIJobRunning"))
    first = _status(tj, job, [crashed])
    assert (
        first.diagnosis is not None and log_tail_pod(spec, previous_status(tj), first) == "flowers-worker-1"
    )
    first.diagnosis = first.diagnosis.model_copy(update={"logTail": ["boom"]})  # what the caller reads
    tj["status"] = first.as_patch()
    again = _status(tj, job, [crashed], now=T0 + timedelta(seconds=30))
    assert again.diagnosis is not None and again.diagnosis.logTail == ["boom"]
    assert log_tail_pod(spec, previous_status(tj), again) is None
    tj["spec"]["diagnostics"] = {"logTail": False}  # opting out removes what was copied
    hidden = _status(tj, job, [crashed], now=T0 + timedelta(seconds=60))
    assert hidden.diagnosis is not None and hidden.diagnosis.logTail == []


def _event(
    kind: str, name: str, reason: str, message: str, at: str = "2026-01-01T00:00:03Z"
) -> dict[str, Any]:
    return {
        "type": "Warning",
        "reason": reason,
        "message": message,
        "involvedObject": {"kind": kind, "name": name},
        "lastTimestamp": at,
    }


DENIED = (
    'worker pod created failed: pods "flowers-worker-0" is forbidden: '
    'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false '
    '(container "trainer" must set allowPrivilegeEscalation=false)'
)


def test_a_worker_refused_by_pod_security_is_why_the_job_is_pending_and_then_fails(
    tj: dict[str, Any],
) -> None:
    tj["spec"]["pendingTimeoutSeconds"] = 60
    events = [_event("MPIJob", "flowers", "MPIJobFailed", DENIED)]
    job = mpijob(("Created", "MPIJobCreated"))
    status = _status(tj, job, [], events=events)
    assert (status.phase, status.reason) == ("Pending", "PodSecurityDenied")
    assert (
        status.message.startswith("flowers-worker-0: worker pod created failed")
        and "PodSecurity" in status.message
    )
    scheduled = _by_type(status)["Scheduled"]
    assert (scheduled.status, scheduled.reason) == ("False", "PodSecurityDenied")
    late = _status(tj, job, [], events=events, now=T0 + timedelta(seconds=61))
    assert (late.phase, late.reason) == ("Failed", "PodSecurityDenied")
    assert late.diagnosis is not None and late.diagnosis.pod == "flowers-worker-0"


def test_a_launcher_over_quota_is_shown_until_a_launcher_pod_exists(tj: dict[str, Any]) -> None:
    quota = _event(
        "Job",
        "flowers-launcher",
        "FailedCreate",
        'Error creating: pods "flowers-launcher-x7k2p" is forbidden: '
        "exceeded quota: team-a, requested: cpu=250m",
    )
    workers = [pod("flowers-worker-0", "worker"), pod("flowers-worker-1", "worker")]
    job = mpijob(("Created", "MPIJobCreated"))
    status = _status(tj, job, workers, events=[quota])
    assert status.reason == "QuotaExceeded" and "exceeded quota: team-a" in status.message
    started = _status(tj, job, [*workers, pod("flowers-launcher-abcde", "launcher")], events=[quota])
    assert started.reason == "Starting"


def test_a_volume_that_cannot_attach_is_shown_while_its_pod_waits(tj: dict[str, Any]) -> None:
    attach = _event(
        "Pod",
        "flowers-worker-1",
        "FailedAttachVolume",
        'Multi-Attach error for volume "pvc-1" Volume is already exclusively attached to one node',
    )
    waiting = _scheduled_pod("flowers-worker-1", "worker")
    job = mpijob(("Created", "MPIJobCreated"))
    status = _status(tj, job, [pod("flowers-worker-0", "worker"), waiting], events=[attach])
    assert status.reason == "FailedAttachVolume" and status.message.startswith(
        "flowers-worker-1: Multi-Attach"
    )
    assert _by_type(status)["Scheduled"].status == "True"  # the pod is on a node; its volume is not
    running = [pod("flowers-worker-0", "worker"), pod("flowers-worker-1", "worker")]
    assert _status(tj, job, running, events=[attach]).reason == "Starting"


def test_refusals_a_created_pod_outlived_and_the_jobs_own_failure_event_are_not_start_problems(
    tj: dict[str, Any],
) -> None:
    outlived = _event("MPIJob", "flowers", "MPIJobFailed", DENIED)
    own = _event("MPIJob", "flowers", "MPIJobFailed", "MPIJob team-a/flowers has failed")
    status = _status(
        tj,
        mpijob(("Created", "MPIJobCreated")),
        [_scheduled_pod("flowers-worker-0", "worker")],
        events=[outlived, own],
    )
    assert status.reason == "Starting"


def test_an_edit_after_the_end_is_observed_without_changing_the_verdict(tj: dict[str, Any]) -> None:
    done = _status(tj, mpijob(("Succeeded", "MPIJobSucceeded")), [pod("flowers-worker-0", "worker")])
    tj["status"] = done.as_patch()
    tj["metadata"]["generation"] = 2  # e.g. runPolicy.ttlSecondsAfterFinished set afterwards
    tj["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 60}
    later = _status(tj, None, [], now=T0 + timedelta(hours=1))
    assert later.observedGeneration == 2 and {c.observedGeneration for c in later.conditions} == {2}
    assert [(c.type, c.status, c.reason, c.lastTransitionTime) for c in later.conditions] == [
        (c.type, c.status, c.reason, c.lastTransitionTime) for c in done.conditions
    ]
    assert later.phase == "Succeeded" and later.completionTime == done.completionTime
