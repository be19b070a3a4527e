"""Why a job's pods could not be created or cannot start, read from Warning events (pure, no API calls).

A pod that admission refuses (Pod Security, a ResourceQuota) never exists, so nothing in the pod list says
why the job does not start: the mpi-operator records the refusal on the MPIJob (reason `MPIJobFailed`,
"worker pod created failed: pods "<name>" is forbidden: ...") and the Job controller on the launcher Job
(reason `FailedCreate`, "Error creating: ..."). A pod whose volume cannot be attached or mounted exists
but stays ContainerCreating; the kubelet and the attach/detach controller say why on the pod
(`FailedMount`, `FailedAttachVolume`, e.g. "Multi-Attach error for volume ...").
"""

from __future__ import annotations

import re
from typing import Any

Obj = dict[str, Any]

# Which objects' Warning events the caller passes: the MPIJob, its launcher Job, and the job's pods.
CREATE_FAILURE_EVENTS = frozenset({"MPIJobFailed", "FailedCreate"})
VOLUME_EVENTS = frozenset({"FailedMount", "FailedAttachVolume"})
EVENT_REASONS = CREATE_FAILURE_EVENTS | VOLUME_EVENTS
# The reasons start_problem returns for a pod that was never created.
CREATION_REASONS = frozenset({"PodSecurityDenied", "QuotaExceeded", "Forbidden", "FailedCreate"})

_CREATE_MESSAGE = re.compile(r"(worker pod created failed|launcher pod created failed|Error creating): ")
_NAMED_POD = re.compile(r'pods? "(?P<pod>[^"]+)"')


def creation_reason(message: str) -> str:
    """A CamelCase reason for an admission refusal, from the API server's words."""
    if "violates PodSecurity" in message:
        return "PodSecurityDenied"
    if "exceeded quota" in message:
        return "QuotaExceeded"
    if "forbidden" in message:
        return "Forbidden"
    return "FailedCreate"


def _when(event: Obj) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or "")


def _role(pod: Obj, label: str) -> str:
    return str(((pod.get("metadata") or {}).get("labels") or {}).get(label, ""))


def start_problem(pods: list[Obj], events: list[Obj], role_label: str) -> tuple[str, str, str] | None:
    """(reason, message, object) of the latest creation refusal or volume error that still holds.

    A refusal is outlived once the pod it names exists (a launcher's, once any launcher pod exists); a
    volume error once its pod runs. `role_label` is the pod label holding launcher/worker.
    """
    by_name = {str((p.get("metadata") or {}).get("name", "")): p for p in pods}
    launcher_exists = any(_role(p, role_label) == "launcher" for p in pods)
    found: list[tuple[str, tuple[str, str, str]]] = []
    for event in events:
        reason, message = str(event.get("reason", "")), str(event.get("message", ""))
        involved = event.get("involvedObject") or {}
        if reason in CREATE_FAILURE_EVENTS and involved.get("kind") in {"MPIJob", "Job"}:
            if not _CREATE_MESSAGE.search(message):
                continue  # MPIJobFailed also reports the job's own failure
            named = _NAMED_POD.search(message)
            pod = named.group("pod") if named else str(involved.get("name", ""))
            is_launcher = involved.get("kind") == "Job" or message.startswith("launcher")
            if pod in by_name or (is_launcher and launcher_exists):
                continue
            found.append((_when(event), (creation_reason(message), message, pod)))
        elif reason in VOLUME_EVENTS and involved.get("kind", "Pod") == "Pod":
            pod = str(involved.get("name", ""))
            if pod in by_name and (by_name[pod].get("status") or {}).get("phase") == "Pending":
                found.append((_when(event), (reason, message, pod)))
    if not found:
        return None
    return max(found, key=lambda item: item[0])[1]
