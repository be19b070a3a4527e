"""ServiceMonitors and PodMonitors resolved to Prometheus file_sd targets as the Prometheus operator would.

The objects are written here by hand in the API's shape; tests/integration/platform/test_helm_install.py
resolves the chart's real monitors against a real install and has a real Prometheus scrape the result.
"""

from __future__ import annotations

from typing import Any

import pytest

from fieldkube.localcluster.monitors import (
    pod_monitor_targets,
    selector_matches,
    service_monitor_targets,
)


def obj(
    kind: str, name: str, namespace: str = "ml", labels: dict[str, str] | None = None, **rest: Any
) -> Any:
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace, "labels": labels or {}}, **rest}


def test_selector_matches_labels_and_every_expression_operator() -> None:
    labels = {"app": "x", "tier": "gpu"}
    assert selector_matches({"matchLabels": {"app": "x"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "y"}}, labels)
    assert selector_matches({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}, labels)
    assert selector_matches(
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gpu"]}]}, labels
    )
    assert not selector_matches(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gpu"]}]}, labels
    )
    assert selector_matches({}, labels)
    with pytest.raises(ValueError, match="Gt"):
        selector_matches({"matchExpressions": [{"key": "tier", "operator": "Gt"}]}, labels)


def service_monitor(**spec: Any) -> Any:
    base = {"selector": {"matchLabels": {"app": "serve"}}, "endpoints": [{"port": "http"}]}
    return obj("ServiceMonitor", "serve", spec={**base, **spec})


def endpoint_slice(service: str, namespace: str = "ml") -> Any:
    return obj(
        "EndpointSlice",
        f"{service}-abcde",
        namespace,
        {"kubernetes.io/service-name": service},
        ports=[{"name": "http", "port": 8080}, {"name": "grpc", "port": 9000}],
        endpoints=[
            {"addresses": ["10.0.0.5"], "conditions": {"ready": True}, "targetRef": {"name": "serve-1"}},
            {"addresses": ["10.0.0.6"], "conditions": {"ready": False}, "targetRef": {"name": "serve-2"}},
        ],
    )


def test_a_service_monitor_scrapes_every_endpoint_of_the_named_port_ready_or_not() -> None:
    services = [
        obj("Service", "serve", labels={"app": "serve"}),
        obj("Service", "other", labels={"app": "o"}),
    ]
    slices = [endpoint_slice("serve"), endpoint_slice("other")]
    groups = service_monitor_targets(service_monitor(), services, slices)
    assert [g["targets"] for g in groups] == [["10.0.0.5:8080"], ["10.0.0.6:8080"]]
    assert groups[0]["labels"] == {
        "job": "serve",
        "namespace": "ml",
        "service": "serve",
        "pod": "serve-1",
        "endpoint": "http",
        "__metrics_path__": "/metrics",
    }
    assert not groups[0]["honor_labels"]


def test_a_service_monitor_stays_in_its_namespaces_and_honours_job_label_and_honor_labels() -> None:
    services = [
        obj("Service", "serve", labels={"app": "serve", "team": "vision"}),
        obj("Service", "serve", "elsewhere", labels={"app": "serve"}),
    ]
    slices = [endpoint_slice("serve"), endpoint_slice("serve", "elsewhere")]
    monitor = service_monitor(
        jobLabel="team", endpoints=[{"port": "http", "honorLabels": True, "path": "/m"}]
    )
    groups = service_monitor_targets(monitor, services, slices)
    assert {g["labels"]["namespace"] for g in groups} == {"ml"}
    assert {g["labels"]["job"] for g in groups} == {"vision"}
    assert all(g["honor_labels"] and g["labels"]["__metrics_path__"] == "/m" for g in groups)
    everywhere = service_monitor(namespaceSelector={"any": True})
    assert {g["labels"]["namespace"] for g in service_monitor_targets(everywhere, services, slices)} == {
        "ml",
        "elsewhere",
    }
    no_such_port = service_monitor(endpoints=[{"port": "metrics"}])
    assert service_monitor_targets(no_such_port, services, slices) == []


def pod(name: str, phase: str = "Running", ip: str | None = "10.1.0.7", **labels: str) -> Any:
    ports = [{"name": "metrics-0", "containerPort": 9400}, {"name": "metrics-1", "containerPort": 9401}]
    return obj(
        "Pod",
        name,
        "team-a",
        {"fieldkube.io/training-job": "tj", **labels},
        spec={"containers": [{"name": "worker", "ports": [*ports, {"name": "ssh", "containerPort": 2222}]}]},
        status={"phase": phase, **({"podIP": ip} if ip else {})},
    )


def test_a_pod_monitor_scrapes_each_named_port_of_live_selected_pods() -> None:
    monitor = obj(
        "PodMonitor",
        "trainer",
        "platform",
        spec={
            "selector": {"matchExpressions": [{"key": "fieldkube.io/training-job", "operator": "Exists"}]},
            "namespaceSelector": {"any": True},
            "podMetricsEndpoints": [{"port": f"metrics-{i}"} for i in range(8)],
        },
    )
    pods = [
        pod("tj-worker-0"),
        pod("tj-worker-1", phase="Pending", ip=None),  # no IP yet: nothing to scrape
        pod("tj-worker-2", phase="Succeeded"),  # ended: dropped
    ]
    groups = pod_monitor_targets(monitor, pods)
    assert [g["targets"] for g in groups] == [["10.1.0.7:9400"], ["10.1.0.7:9401"]]
    assert groups[1]["labels"] == {
        "job": "platform/trainer",
        "namespace": "team-a",
        "pod": "tj-worker-0",
        "container": "worker",
        "endpoint": "metrics-1",
        "__metrics_path__": "/metrics",
    }
    only_own_namespace = obj(
        "PodMonitor", "trainer", "platform", spec={**monitor["spec"], "namespaceSelector": {}}
    )
    assert pod_monitor_targets(only_own_namespace, pods) == []
