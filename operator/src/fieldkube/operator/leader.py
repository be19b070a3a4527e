"""Leader election on a coordination.k8s.io Lease: of several operator replicas, one acts at a time.

The algorithm Kubernetes' own controllers use: the holder renews the Lease every RETRY seconds; another
replica takes it only once it has seen the same record unchanged for the lease duration (measured on its
own clock, so clocks need not agree); a holder that could not renew within RENEW_DEADLINE stops acting
before anyone else may take over. A replica that stops cleanly releases the Lease so the next takes over at
once. Writes carry the resourceVersion read, so two replicas racing for the Lease cannot both win.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

log = logging.getLogger("fieldkube.operator.leader")
LEASE_DURATION_S = 15
RENEW_DEADLINE_S = 10.0
RETRY_S = 2.0


class MicroTime(datetime):
    """A Lease's times: the API server wants all six fraction digits, which datetime.isoformat drops at .0."""

    def isoformat(self, sep: str = "T", timespec: str = "microseconds") -> str:
        return super().isoformat(sep, timespec)

    @classmethod
    def of(cls, moment: datetime) -> MicroTime:
        return cls.fromtimestamp(moment.timestamp(), UTC)


def _now() -> MicroTime:
    return MicroTime.now(UTC)


class LeaderElector(threading.Thread):
    """Calls ``started()`` on winning the Lease and ``stopped()`` on losing it; ``leading`` says which."""

    def __init__(
        self,
        api: client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        started: Callable[[], None],
        stopped: Callable[[], None],
        lease_duration_s: int = LEASE_DURATION_S,
        renew_deadline_s: float = RENEW_DEADLINE_S,
        retry_s: float = RETRY_S,
    ) -> None:
        super().__init__(name="leader-election", daemon=True)
        self.api, self.namespace, self.lease_name, self.identity = api, namespace, name, identity
        self.started, self.stopped = started, stopped
        self.duration, self.deadline, self.retry = lease_duration_s, renew_deadline_s, retry_s
        self.leading = threading.Event()
        self._halt = threading.Event()
        self._observed: tuple[Any, float] | None = None  # (the other holder's record, when first seen)
        self._renewed = 0.0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                held = self._try_acquire_or_renew()
            except (ApiException, HTTPError, OSError) as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.lease_name, exc)
                held = False
            now = time.monotonic()
            if held:
                self._renewed = now
                if not self.leading.is_set():
                    log.info(
                        "leading: lease %s/%s held by %s", self.namespace, self.lease_name, self.identity
                    )
                    self.leading.set()
                    self.started()
            elif self.leading.is_set() and now - self._renewed > self.deadline:
                log.warning("lost the lease %s/%s: stopping work", self.namespace, self.lease_name)
                self.leading.clear()
                self.stopped()
            self._halt.wait(self.retry)

    def stop(self) -> None:
        """Stop competing; release the Lease when held so another replica takes over without waiting."""
        self._halt.set()
        if not self.leading.is_set():
            return
        self.leading.clear()
        self.stopped()
        try:
            lease = self.api.read_namespaced_lease(self.lease_name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.acquire_time = None
                lease.spec.lease_duration_seconds = 1
                lease.spec.renew_time = _now()
                self.api.replace_namespaced_lease(self.lease_name, self.namespace, lease)
        except (ApiException, HTTPError, OSError) as exc:
            log.warning("could not release the lease %s/%s: %s", self.namespace, self.lease_name, exc)

    def _try_acquire_or_renew(self) -> bool:
        try:
            lease = self.api.read_namespaced_lease(self.lease_name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.lease_name, namespace=self.namespace),
                spec=self._spec(transitions=0, acquired=_now()),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as conflict:
                if conflict.status == 409:  # another replica created it first
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        if holder == self.identity:
            lease.spec = self._spec(spec.lease_transitions or 0, spec.acquire_time)
            return self._write(lease)
        record = (holder, spec.renew_time, spec.lease_duration_seconds)
        now = time.monotonic()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        duration = spec.lease_duration_seconds or self.duration
        if holder and now - self._observed[1] < duration:
            return False  # held by another replica that renewed within its lease duration
        lease.spec = self._spec((spec.lease_transitions or 0) + 1, _now())
        return self._write(lease)

    def _spec(self, transitions: int, acquired: datetime | None) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.duration,
            acquire_time=MicroTime.of(acquired) if acquired is not None else _now(),
            renew_time=_now(),
            lease_transitions=transitions,
        )

    def _write(self, lease: client.V1Lease) -> bool:
        """Replace with the resourceVersion read: a 409 means another replica wrote first."""
        try:
            self.api.replace_namespaced_lease(self.lease_name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
