"""A watch-fed cache of the objects a TrainingJob owns (MPIJobs, pods), selected on the server by label,
and of the Warning events that explain why its pods do not start.

Why not kopf for these: kopf watches a resource cluster-wide and filters labels in memory, so every pod of
the cluster passes through the operator. Here the API server sends only objects carrying the job label
(events: only Warnings), each stored trimmed to the fields the status function reads, keyed by
(namespace, job). One thread per watched resource and namespace: list, then watch from the last
resourceVersion; on an expired or broken watch, list again and replace the cache (objects deleted
meanwhile are noticed then).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from fieldkube.operator import names, pod_events

log = logging.getLogger("fieldkube.operator.informer")
Obj = dict[str, Any]
Key = tuple[str, str]
"""(namespace, TrainingJob name)."""

WATCH_TIMEOUT_S = 300
RETRY_S = 2.0


def job_key(obj: Obj) -> Key | None:
    meta = obj.get("metadata") or {}
    job = (meta.get("labels") or {}).get(names.JOB_LABEL)
    return (str(meta.get("namespace")), str(job)) if job else None


# Events carry no labels: the job is read from the name of the object they are about (the MPIJob is named
# like the job, its launcher Job <job>-launcher, its pods <job>-worker-<i> and <job>-launcher-<suffix>).
_OWNED_NAME = re.compile(r"^(?P<job>.+?)-(worker-[0-9]+|launcher(-[a-z0-9]+)?)$")


def event_key(event: Obj) -> Key | None:
    """The job a Warning event that pod_events reads is about, or None for any other event."""
    if event.get("reason") not in pod_events.EVENT_REASONS:
        return None
    involved = event.get("involvedObject") or {}
    name, kind = str(involved.get("name", "")), involved.get("kind")
    namespace = str(involved.get("namespace") or (event.get("metadata") or {}).get("namespace"))
    if kind == "MPIJob":
        return (namespace, name)
    owned = _OWNED_NAME.match(name)
    if kind in {"Job", "Pod"} and owned:
        return (namespace, owned.group("job"))
    return None


def trim_event(event: Obj) -> Obj:
    involved = event.get("involvedObject") or {}
    return {
        "reason": event.get("reason"),
        "message": event.get("message"),
        "type": event.get("type"),
        "involvedObject": {"kind": involved.get("kind"), "name": involved.get("name")},
        "lastTimestamp": event.get("lastTimestamp"),
        "eventTime": event.get("eventTime"),
    }


def trim_pod(pod: Obj) -> Obj:
    """What status.py reads of a pod (a full pod is ten times larger)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": meta.get("labels") or {},
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
        "status": {
            key: status[key]
            for key in ("phase", "reason", "message", "conditions", "containerStatuses")
            if key in status
        },
    }


def trim_mpijob(mpijob: Obj) -> Obj:
    """What the reconciler and status.py read of an MPIJob."""
    meta = mpijob.get("metadata") or {}
    run_policy = ((mpijob.get("spec") or {}).get("runPolicy")) or {}
    return {
        "metadata": {
            key: meta[key]
            for key in ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp")
            if key in meta
        },
        "spec": {"runPolicy": {"suspend": bool(run_policy.get("suspend", False))}},
        "status": mpijob.get("status") or {},
    }


@dataclass
class Cache:
    """Objects of one kind by job, then by object name; safe to read from any thread."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _by_job: dict[Key, dict[str, Obj]] = field(default_factory=dict)

    def get(self, key: Key) -> list[Obj]:
        with self._lock:
            return list((self._by_job.get(key) or {}).values())

    def upsert(self, key: Key, name: str, obj: Obj) -> None:
        with self._lock:
            self._by_job.setdefault(key, {})[name] = obj

    def remove(self, key: Key, name: str) -> None:
        with self._lock:
            objs = self._by_job.get(key)
            if objs is not None:
                objs.pop(name, None)
                if not objs:
                    del self._by_job[key]

    def replace(self, scope: str | None, objs: dict[Key, dict[str, Obj]]) -> set[Key]:
        """Replace what ``scope`` holds (a namespace; None: all); returns the jobs whose objects changed."""
        with self._lock:
            old = {k: v for k, v in self._by_job.items() if scope is None or k[0] == scope}
            for key in old:
                del self._by_job[key]
            self._by_job.update(objs)
        return {k for k in old.keys() | objs.keys() if old.get(k) != objs.get(k)}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._by_job.values())


class Informer(threading.Thread):
    """Keeps ``cache`` equal to the API server's objects of one list call; calls ``changed(key)`` per change.

    ``list_call(resource_version=..., watch=..., ...)`` is a kubernetes-client list function with its
    resource and namespace already bound; ``selector`` its server-side selection (label_selector or
    field_selector); ``key`` maps an object to its job (None: not kept).
    """

    def __init__(
        self,
        what: str,
        list_call: Callable[..., Any],
        cache: Cache,
        trim: Callable[[Obj], Obj],
        changed: Callable[[Key], None],
        namespace: str | None = None,
        selector: dict[str, str] | None = None,
        key: Callable[[Obj], Key | None] = job_key,
    ) -> None:
        super().__init__(name=f"informer-{what}-{namespace or 'all'}", daemon=True)
        self.what, self.list_call, self.cache, self.trim = what, list_call, cache, trim
        self.changed, self.namespace, self.key = changed, namespace, key
        self.selector = selector if selector is not None else {"label_selector": names.JOB_LABEL}
        self.synced = threading.Event()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop after the current event (the thread is a daemon: a watch waiting for its next event does
        not hold the process; closing its connection from here could block on the reading thread)."""
        self._stop.set()

    def run(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                    self.synced.set()
                version = self._follow(version)
            except (ApiException, HTTPError, OSError, ValueError) as exc:
                version = None
                if self._stop.is_set():
                    return
                if getattr(exc, "status", None) != 410:  # 410: the watch expired; list again at once
                    log.warning("%s watch failed (%s); listing again in %.0fs", self.what, exc, RETRY_S)
                    self._stop.wait(RETRY_S)

    def _relist(self) -> str:
        response = self.list_call(**self.selector, _preload_content=False)
        listing = json.loads(response.data)
        objs: dict[Key, dict[str, Obj]] = {}
        for item in listing.get("items") or []:
            key = self.key(item)
            if key is not None:
                objs.setdefault(key, {})[item["metadata"]["name"]] = self.trim(item)
        for key in self.cache.replace(self.namespace, objs):
            self.changed(key)
        return str(listing["metadata"]["resourceVersion"])

    def _events(self, version: str) -> Iterator[Obj]:
        """The watch's events as plain dicts, one ``json.loads`` each.

        Not ``kubernetes.watch.Watch.stream``: for a typed call (pods, events of all namespaces) it turns
        every event's object back into JSON and then into the client's model classes, which the cache
        never reads; in a burst of 1,000 jobs that was most of the operator's CPU.
        """
        response = self.list_call(
            **self.selector,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_S,
            _preload_content=False,
        )
        try:
            for line in watch.watch.iter_resp_lines(response):
                if line.strip():
                    yield json.loads(line)
        finally:  # closed first: a stream left mid-way must not go back to the pool with unread events
            response.close()
            response.release_conn()

    def _follow(self, version: str) -> str:
        """Apply watch events until the stream ends (returns the last version seen) or breaks (raises)."""
        started = time.monotonic()
        for event in self._events(version):
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                raise ApiException(status=obj.get("code"), reason=obj.get("message"))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            key = self.key(obj)
            if key is None:
                continue
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                self.cache.remove(key, name)
            else:
                self.cache.upsert(key, name, self.trim(obj))
            self.changed(key)
            if self._stop.is_set():
                break
        log.debug("%s watch ended after %.0fs", self.what, time.monotonic() - started)
        return version
