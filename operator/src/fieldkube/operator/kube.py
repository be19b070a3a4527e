"""The operator's Kubernetes API calls, as plain dicts (the status function and tests speak dicts)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fieldkube.operator import names, spec

Obj = dict[str, Any]


class CredentialsError(Exception):
    """Neither in-cluster credentials nor a usable kubeconfig were found."""


def load_config() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            where = os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise CredentialsError(
                f"no Kubernetes credentials: not in a pod, and the kubeconfig {where} is unusable ({exc})"
            ) from None
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def _json(response: Any) -> Obj:
    data: Obj = json.loads(response.data)
    return data


class Cluster:
    """Reads and writes the objects one TrainingJob owns."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    def pod_lister(self, namespace: str | None) -> Callable[..., Any]:
        """The list (and watch) call for pods of one namespace, or of all when None."""
        if namespace is None:
            return self.core.list_pod_for_all_namespaces
        return functools.partial(self.core.list_namespaced_pod, namespace)

    def event_lister(self, namespace: str | None) -> Callable[..., Any]:
        if namespace is None:
            return self.core.list_event_for_all_namespaces
        return functools.partial(self.core.list_namespaced_event, namespace)

    def mpijob_lister(self, namespace: str | None) -> Callable[..., Any]:
        args = (names.MPIJOB_GROUP, names.MPIJOB_VERSION)
        if namespace is None:
            return functools.partial(self.custom.list_cluster_custom_object, *args, names.MPIJOB_PLURAL)
        return functools.partial(
            self.custom.list_namespaced_custom_object, *args, namespace, names.MPIJOB_PLURAL
        )

    def create_mpijob(self, body: Obj) -> Obj:
        """Create and return the stored object; raises ApiException (409 when it already exists)."""
        return _json(
            self.custom.create_namespaced_custom_object(
                names.MPIJOB_GROUP,
                names.MPIJOB_VERSION,
                body["metadata"]["namespace"],
                names.MPIJOB_PLURAL,
                body,
                _preload_content=False,
            )
        )

    def patch_mpijob(self, namespace: str, name: str, patch: Obj) -> None:
        self.custom.patch_namespaced_custom_object(
            names.MPIJOB_GROUP, names.MPIJOB_VERSION, namespace, names.MPIJOB_PLURAL, name, patch
        )

    def list_scheduling_events(self, namespace: str, pod: str) -> list[Obj]:
        """FailedScheduling events of one pod (a field selector: cost independent of the namespace size)."""
        response = self.core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod},reason=FailedScheduling",
            _preload_content=False,
        )
        return list(_json(response).get("items") or [])

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> list[str]:
        """The last log lines, or [] when the kubelet cannot serve them (e.g. the pod is gone)."""
        try:
            text = self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=lines)
        except (ApiException, ValueError):
            return []
        return [line for line in str(text).splitlines() if line.strip()][-lines:]

    def patch_trainingjob_status(self, namespace: str, name: str, patch: Obj) -> Obj:
        """Merge-patch the status subresource; returns the stored TrainingJob."""
        return _json(
            self.custom.patch_namespaced_custom_object_status(
                spec.GROUP,
                spec.VERSION,
                namespace,
                spec.PLURAL,
                name,
                {"status": patch},
                _preload_content=False,
            )
        )

    def set_finalizers(self, namespace: str, name: str, finalizers: list[str], resource_version: str) -> None:
        """Write metadata.finalizers if the object is still at ``resource_version`` (else 409)."""
        self.custom.patch_namespaced_custom_object(
            spec.GROUP,
            spec.VERSION,
            namespace,
            spec.PLURAL,
            name,
            {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}},
        )

    def delete_trainingjob(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                spec.GROUP, spec.VERSION, namespace, spec.PLURAL, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning `old` into `new` ({} when equal); removed keys become null."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: Obj = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) else value
    return patch
