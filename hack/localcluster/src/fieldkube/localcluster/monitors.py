"""Prometheus targets from ServiceMonitors and PodMonitors, for a Prometheus without Kubernetes discovery.

Debian's Prometheus is built without ``kubernetes_sd_configs`` and no Prometheus operator runs on the local
cluster, yet the chart's monitoring is its ServiceMonitor and PodMonitor objects. So the local cluster does
the operator's part itself: it resolves those objects (Services → EndpointSlices, pods by selector and named
container port) into ``file_sd`` target groups with the labels the Prometheus operator gives a target
(``job``, ``namespace``, ``service``, ``pod``, ``container``, ``endpoint``), and :class:`FileDiscovery`
rewrites that file every few seconds, following training ranks as they come and go. Endpoints with
``honorLabels`` go to a second file, scraped by a job with ``honor_labels: true``. What Prometheus then
scrapes is decided by the chart's objects alone: a wrong selector or port name leaves a target missing.

The resolution functions are pure (objects in, target groups out); only :func:`discover` talks to the API.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldkube.localcluster.procs import ClusterError, free_port

if TYPE_CHECKING:
    from fieldkube.localcluster.harness import LocalCluster

Obj = Mapping[str, Any]
# One file_sd entry, {"targets": ["ip:port"], "labels": {...}}, plus "honor_labels": bool (which file).
TargetGroup = dict[str, Any]
TARGET_FILES = {False: "targets.json", True: "targets-honor-labels.json"}
MONITORING_KINDS = ("servicemonitors", "podmonitors", "prometheusrules")


def selector_matches(selector: Obj, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) applied to a set of labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator not in ("Exists", "DoesNotExist", "In", "NotIn"):
            raise ValueError(f"selector operator {operator!r} is not one of Exists, DoesNotExist, In, NotIn")
    return True


def in_namespaces(monitor: Obj, namespace: str) -> bool:
    """Whether a monitor's namespaceSelector covers ``namespace`` (default: the monitor's own)."""
    chosen = monitor["spec"].get("namespaceSelector") or {}
    if chosen.get("any"):
        return True
    names = chosen.get("matchNames") or [monitor["metadata"]["namespace"]]
    return namespace in names


def _labels(obj: Obj) -> Mapping[str, str]:
    return obj["metadata"].get("labels") or {}


def service_monitor_targets(
    monitor: Obj, services: Iterable[Obj], slices: Iterable[Obj]
) -> list[TargetGroup]:
    """Targets of a ServiceMonitor: every endpoint (ready or not) of the selected Services' named ports.

    ``job`` is the Service's name, or the value of its ``spec.jobLabel`` label, as the operator sets it.
    """
    spec = monitor["spec"]
    chosen = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): s
        for s in services
        if in_namespaces(monitor, s["metadata"]["namespace"])
        and selector_matches(spec["selector"], _labels(s))
    }
    groups: list[TargetGroup] = []
    for endpoint_slice in slices:
        namespace = endpoint_slice["metadata"]["namespace"]
        service_name = _labels(endpoint_slice).get("kubernetes.io/service-name", "")
        service = chosen.get((namespace, service_name))
        if service is None:
            continue
        job = _labels(service).get(spec.get("jobLabel", ""), service_name)
        ports = {p.get("name", ""): p["port"] for p in endpoint_slice.get("ports") or []}
        for endpoint in spec.get("endpoints") or []:
            port = ports.get(endpoint.get("port", ""))
            if port is None:
                continue
            for address in endpoint_slice.get("endpoints") or []:
                pod = (address.get("targetRef") or {}).get("name", "")
                groups += [
                    {
                        "targets": [f"{ip}:{port}" for ip in address.get("addresses") or []],
                        "labels": {
                            "job": job,
                            "namespace": namespace,
                            "service": service_name,
                            "pod": pod,
                            "endpoint": endpoint["port"],
                            "__metrics_path__": endpoint.get("path", "/metrics"),
                        },
                        "honor_labels": bool(endpoint.get("honorLabels")),
                    }
                ]
    return [g for g in groups if g["targets"]]


def pod_monitor_targets(monitor: Obj, pods: Iterable[Obj]) -> list[TargetGroup]:
    """Targets of a PodMonitor: the named container ports of selected pods that have an IP.

    ``job`` is ``<namespace>/<PodMonitor name>`` (or the pod's ``spec.jobLabel`` label); pods that have
    ended (Succeeded, Failed) are dropped, as the operator's generated configuration drops them.
    """
    spec = monitor["spec"]
    default_job = f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    groups: list[TargetGroup] = []
    for pod in pods:
        namespace, status = pod["metadata"]["namespace"], pod.get("status") or {}
        if not in_namespaces(monitor, namespace) or not selector_matches(spec["selector"], _labels(pod)):
            continue
        if status.get("phase") in ("Succeeded", "Failed") or not status.get("podIP"):
            continue
        for endpoint in spec.get("podMetricsEndpoints") or []:
            for container in pod["spec"]["containers"]:
                for port in container.get("ports") or []:
                    if port.get("name") != endpoint.get("port"):
                        continue
                    labels = {
                        "job": _labels(pod).get(spec.get("jobLabel", ""), default_job),
                        "namespace": namespace,
                        "pod": pod["metadata"]["name"],
                        "container": container["name"],
                        "endpoint": endpoint["port"],
                        "__metrics_path__": endpoint.get("path", "/metrics"),
                    }
                    target = f"{status['podIP']}:{port['containerPort']}"
                    honor = bool(endpoint.get("honorLabels"))
                    groups.append({"targets": [target], "labels": labels, "honor_labels": honor})
    return groups


def discover(cluster: LocalCluster, namespace: str) -> list[TargetGroup]:
    """The target groups of every ServiceMonitor and PodMonitor in ``namespace``, resolved now."""
    monitors = cluster.get_json("servicemonitors.monitoring.coreos.com,podmonitors.monitoring.coreos.com",
                                namespace=namespace)["items"]  # fmt: skip
    if not monitors:
        return []
    everywhere = any((m["spec"].get("namespaceSelector") or {}).get("any") for m in monitors)
    scope = ["--all-namespaces"] if everywhere else []
    found = cluster.get_json(
        "services,endpointslices,pods", *scope, namespace=None if everywhere else namespace
    )
    by_kind: dict[str, list[Obj]] = {"Service": [], "EndpointSlice": [], "Pod": []}
    for item in found["items"]:
        by_kind[item["kind"]].append(item)
    groups: list[TargetGroup] = []
    for monitor in monitors:
        if monitor["kind"] == "ServiceMonitor":
            groups += service_monitor_targets(monitor, by_kind["Service"], by_kind["EndpointSlice"])
        else:
            groups += pod_monitor_targets(monitor, by_kind["Pod"])
    return groups


class FileDiscovery:
    """Keeps the ``file_sd`` files in ``directory`` equal to :func:`discover`'s answer, refreshed every
    ``interval`` s (:data:`TARGET_FILES`: one without, one with ``honorLabels``).

    Files are replaced atomically (Prometheus never reads half of one). A failed refresh keeps the last
    targets and is retried; the error of the latest failure is in ``last_error``.
    """

    def __init__(self, cluster: LocalCluster, namespace: str, directory: Path, interval: float = 2.0) -> None:
        self.cluster, self.namespace, self.directory, self.interval = cluster, namespace, directory, interval
        self.last_error: str | None = None
        self.seen: set[tuple[str, str]] = set()  # (job, target) ever discovered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="file-discovery", daemon=True)

    def refresh(self) -> list[TargetGroup]:
        groups = discover(self.cluster, self.namespace)
        self.directory.mkdir(parents=True, exist_ok=True)
        for honor, name in TARGET_FILES.items():
            chosen = [
                {"targets": g["targets"], "labels": g["labels"]} for g in groups if g["honor_labels"] == honor
            ]
            partial = self.directory / f".{name}.tmp"
            partial.write_text(json.dumps(chosen, indent=1))
            partial.replace(self.directory / name)
        self.seen |= {(g["labels"]["job"], t) for g in groups for t in g["targets"]}
        return groups

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                self.last_error = None
            except Exception as error:  # a refresh may race a deletion: keep the last files
                self.last_error = f"{type(error).__name__}: {error}"
            self._stop.wait(self.interval)

    def __enter__(self) -> FileDiscovery:
        self.refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def install_crds(cluster: LocalCluster) -> None:
    """Apply the prometheus-operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule, ...) from its
    pinned Go module, as hack/build-cluster-bins.sh cached them, and wait until they are served."""
    directory = cluster.binaries.prometheus_operator_crds
    files = sorted(directory.glob("monitoring.coreos.com_*.yaml"))
    if not files:
        raise ClusterError(f"no prometheus-operator CRDs in {directory}: run hack/build-cluster-bins.sh")
    for path in files:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.wait_crds_established(f"{kind}.monitoring.coreos.com" for kind in MONITORING_KINDS)


def prometheus_rules(cluster: LocalCluster, namespace: str) -> dict[str, Any]:
    """The rule groups of every PrometheusRule in ``namespace``, as a Prometheus rule file holds them."""
    items = cluster.get_json("prometheusrules.monitoring.coreos.com", namespace=namespace)["items"]
    return {"groups": [group for rule in items for group in rule["spec"].get("groups") or []]}


def start_prometheus(
    cluster: LocalCluster,
    root: Path,
    targets: Path,
    rules: Mapping[str, Any] | None = None,
    interval: float = 2.0,
    name: str = "prometheus",
) -> str:
    """Start Prometheus (a process of the cluster, on loopback) scraping the ``file_sd`` files that a
    :class:`FileDiscovery` keeps in the folder ``targets`` and evaluating ``rules``, every ``interval``
    seconds; returns its URL once it answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ClusterError("prometheus is not on PATH (make dev installs the Debian package prometheus)")
    root.mkdir(parents=True, exist_ok=True)
    every = f"{max(1, round(interval))}s"
    config: dict[str, Any] = {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
        "scrape_configs": [
            {
                "job_name": f"monitors{'-honor-labels' if honor else ''}",
                "honor_labels": honor,
                "file_sd_configs": [{"files": [str(targets / name)], "refresh_interval": every}],
            }
            for honor, name in TARGET_FILES.items()
        ],
    }
    if rules is not None:
        (root / "rules.yaml").write_text(json.dumps(rules))
        config["rule_files"] = [str(root / "rules.yaml")]
    (root / "prometheus.yml").write_text(json.dumps(config, indent=1))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cluster.spawn(
        name,
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
    )
    cluster.wait_http(name, f"{url}/-/ready", timeout=60)
    return url
