"""The Helm chart rendered by the pinned helm: lint, schema, what its pods look like, the plain manifests.

Every value set is the defaults plus one file of charts/fieldkube/ci/ (all-values.yaml sets every option).
The server-side dry run against the real control plane is in test_chart_on_cluster.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldkube.contract import names as contract
from fieldkube.localcluster import chart
from fieldkube.localcluster.procs import free_port, wait_until
from fieldkube.operator.cli import _parser as operator_parser
from fieldkube.operator.mpijob_builder import build_mpijob
from fieldkube.operator.spec import parse_spec
from fieldkube.serving.cli import parse_settings

CI_VALUES = sorted((chart.CHART_DIR / "ci").glob("*-values.yaml"))
VALUE_SETS = [pytest.param((), id="defaults")] + [pytest.param((p,), id=p.stem) for p in CI_VALUES]
ALL_VALUES = chart.CHART_DIR / "ci" / "all-values.yaml"
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def render(
    values: tuple[Path, ...], release: str = "fieldkube", namespace: str = "fieldkube-system"
) -> list[Any]:
    return [d for d in yaml.safe_load_all(chart.template(release, namespace, values)) if d]


def by_kind(docs: list[Any], kind: str) -> list[Any]:
    return [d for d in docs if d["kind"] == kind]


def container(docs: list[Any], deployment_suffix: str) -> dict[str, Any]:
    deployment = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith(deployment_suffix)
    )
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def test_the_ci_directory_has_a_file_that_sets_every_option() -> None:
    assert ALL_VALUES in CI_VALUES


@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_lint_passes(values: tuple[Path, ...]) -> None:
    args = ["lint", str(chart.CHART_DIR), "--strict"]
    for path in values:
        args += ["--values", str(path)]
    result = chart.helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_all_values_sets_every_key_of_values_yaml() -> None:
    """A new value must be exercised by all-values.yaml, or the dry run never sees it."""

    def leaves(tree: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        if not isinstance(tree, dict) or not tree:
            return {prefix}
        return set().union(*(leaves(v, (*prefix, k)) for k, v in tree.items()))

    def is_set(tree: Any, path: tuple[str, ...]) -> bool:
        for key in path:
            if not isinstance(tree, dict) or key not in tree:
                return False
            tree = tree[key]
        return tree not in ({}, [], "")

    defaults = yaml.safe_load((chart.CHART_DIR / "values.yaml").read_text())
    everything = yaml.safe_load(ALL_VALUES.read_text())
    # affinity is set for two components; an empty map elsewhere is a choice, not an omission.
    unset = {".".join(p) for p in leaves(defaults) if not is_set(everything, p)}
    assert unset == {"serving.affinity"}, unset


def test_the_schema_rejects_a_wrong_value_naming_the_field() -> None:
    result = chart.helm(
        "template",
        "x",
        str(chart.CHART_DIR),
        "--set",
        "serving.device=tpu",
        "--set",
        "operator.replicas=2",
        check=False,
    )
    assert result.returncode != 0
    assert "/serving/device" in result.stderr and "auto" in result.stderr, result.stderr
    assert "/operator" in result.stderr and "'replicas' not allowed" in result.stderr, result.stderr


def test_serving_without_any_model_fails_with_the_field_named() -> None:
    result = chart.helm(
        "template",
        "x",
        str(chart.CHART_DIR),
        "--set",
        "serving.models.counter=",
        "--set",
        "serving.models.segmenter=",
        check=False,
    )
    assert result.returncode != 0 and "serving.models" in result.stderr, result.stderr


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_pod_meets_the_restricted_pod_security_standard(values: tuple[Path, ...]) -> None:
    workloads = [d for d in render(values) if d["kind"] in POD_KINDS]
    assert len(workloads) == 3  # operator, MLflow, inference service
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in emptydirs, f"{where}: /tmp must be an emptyDir"
        for obj in (workload, workload["spec"]["template"]):
            labels = obj["metadata"]["labels"]
            assert {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
            } <= set(labels), where


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_object_has_the_standard_labels(values: tuple[Path, ...]) -> None:
    for doc in render(values):
        labels = doc["metadata"]["labels"]
        assert labels["helm.sh/chart"] == "fieldkube-0.1.0", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "fieldkube"


def test_two_releases_in_two_namespaces_share_no_object() -> None:
    everything = (ALL_VALUES,)
    first = render(everything, "fieldkube", "team-x")
    second = render(everything, "fieldkube", "team-y")

    def identities(docs: list[Any]) -> set[tuple[str, str, str]]:
        return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs}

    shared = identities(first) & identities(second)
    # Only the dashboards' ConfigMaps may meet, in the one namespace Grafana reads, if both releases put
    # them there (all-values.yaml does): their content is the same.
    assert {s[0] for s in shared} <= {"ConfigMap"}, shared
    cluster_scoped = [d for d in first if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    assert cluster_scoped and all("team-x" in d["metadata"]["name"] for d in cluster_scoped)


def test_the_operator_args_parse_and_it_elects_a_leader_on_its_own_lease() -> None:
    docs = render((ALL_VALUES,), "fieldkube", "team-x")
    op = container(docs, "-operator")
    args = operator_parser().parse_args(op["args"][1:])
    assert args.namespace == ["team-a", "team-b"]
    assert (args.metrics_port, args.health_port) == (9090, 9091)
    assert (
        args.lease_name == "team-x-fieldkube-all-operator" and not args.standalone
    )  # ci/all-values: fullname
    env = {e["name"]: e for e in op["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["FIELDKUBE_MLFLOW_CREDENTIALS_SECRET"]["value"] == "mlflow-client-credentials"
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert sorted(roles) == ["team-a", "team-b", "team-x"]
    # Leases only in the release namespace; the watched namespaces' Roles hold the job rights.
    assert [rule["resources"] for rule in roles["team-x"]["rules"]] == [["leases"]]
    assert all(
        "leases" not in rule["resources"] for ns in ("team-a", "team-b") for rule in roles[ns]["rules"]
    )
    (cluster_role,) = by_kind(docs, "ClusterRole")
    granted = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert granted == {"customresourcedefinitions", "namespaces"}  # kopf's; the job rights are in the Roles


def test_by_default_the_operator_and_the_service_track_to_the_charts_mlflow() -> None:
    docs = render(())
    uri = "http://fieldkube-mlflow.fieldkube-system.svc:5000"
    op_env = {e["name"]: e.get("value") for e in container(docs, "-operator")["env"]}
    assert op_env["FIELDKUBE_MLFLOW_TRACKING_URI"] == uri
    serve = container(docs, "-serve")
    serve_env = {e["name"]: e["value"] for e in serve["env"]}
    assert serve_env["MLFLOW_TRACKING_URI"] == uri
    settings = parse_settings(serve["args"][1:], environ=serve_env)
    assert settings.counter == "models:/fieldkube-counter@champion"
    assert settings.mlflow_tracking_uri == uri and settings.port == serve["ports"][0]["containerPort"]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "fieldkube-mlflow"]
    assert service["spec"]["ports"][0]["port"] == 5000


def test_every_option_of_the_inference_service_reaches_its_pod() -> None:
    docs = render((ALL_VALUES,))
    serve = container(docs, "-serve")
    env = {e["name"]: e["value"] for e in serve["env"]}
    settings = parse_settings(serve["args"][1:], environ=env)
    assert (settings.device, settings.port, settings.max_batch_size) == ("cuda", 8000, 32)
    assert settings.segmenter == "models:/fieldkube-segmenter/3"
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serve["envFrom"] == [{"secretRef": {"name": "mlflow-client-credentials"}}]
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-serve")]
    assert deployment["spec"]["progressDeadlineSeconds"] == 7200


def test_the_pod_monitor_scrapes_every_rank_of_the_pods_the_operator_builds() -> None:
    (monitor,) = by_kind(render((ALL_VALUES,)), "PodMonitor")
    spec = parse_spec({"dataset": {"path": "/d"}, "workers": 2, "gpusPerWorker": 4})
    worker = build_mpijob("flowers", "team-a", "uid", spec)["spec"]["mpiReplicaSpecs"]["Worker"]["template"]
    labels = worker["metadata"]["labels"]
    selector = monitor["spec"]["selector"]
    assert all(labels.get(k) == v for k, v in selector["matchLabels"].items())
    assert all(e["key"] in labels for e in selector["matchExpressions"])
    ports = {p["name"] for p in worker["spec"]["containers"][0]["ports"]}
    assert ports == {f"metrics-{i}" for i in range(4)} and contract.METRICS_PORT == 9400
    assert ports <= {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}


def test_rules_and_dashboards_are_the_files_as_they_are() -> None:
    docs = render((ALL_VALUES,))
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((chart.CHART_DIR / "files/prometheus-rules.yaml").read_text())
    assert "{{ $labels." in yaml.safe_dump(rule["spec"])  # Prometheus' templates, untouched by helm
    boards = {k: v for d in by_kind(docs, "ConfigMap") for k, v in d["data"].items() if k.endswith(".json")}
    files = {p.name: p.read_text() for p in (chart.CHART_DIR / "files/dashboards").glob("*.json")}
    assert boards == files and files
    for cm in by_kind(docs, "ConfigMap"):
        if any(k.endswith(".json") for k in cm["data"]):
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _kept(relabel_configs: list[dict[str, Any]], meta: dict[str, str]) -> bool:
    """Prometheus' `keep` relabelling (sources joined by ';', the regex anchored at both ends)."""
    for rule in relabel_configs:
        if rule.get("action") != "keep":
            continue
        value = ";".join(meta.get(source, "") for source in rule["source_labels"])
        if not re.fullmatch(rule["regex"], value):
            return False
    return True


def test_the_plain_prometheus_scrape_config_keeps_every_rank_of_the_operators_pods() -> None:
    """The ConfigMap for a Prometheus without the prometheus-operator: its pod job, applied to the pod
    discovery labels of the worker pods the operator builds, keeps one target per local rank."""
    docs = by_kind(render((ALL_VALUES,)), "ConfigMap")
    (cm,) = [d for d in docs if d["metadata"]["name"].endswith("scrape-configs")]
    config = yaml.safe_load(cm["data"]["fieldkube-scrape-configs.yaml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"fieldkube-all-operator", "fieldkube-all-serving", "fieldkube-all-trainer"}
    trainer = jobs["fieldkube-all-trainer"]
    watched = {"names": ["team-a", "team-b"]}
    assert trainer["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": watched}]
    spec = parse_spec({"dataset": {"path": "/d"}, "workers": 2, "gpusPerWorker": 4})
    roles = build_mpijob("flowers", "team-a", "uid", spec)["spec"]["mpiReplicaSpecs"]
    kept = []
    for role in ("Launcher", "Worker"):
        template = roles[role]["template"]
        meta = {"__meta_kubernetes_pod_phase": "Running"}
        for key, value in template["metadata"]["labels"].items():
            meta[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
            meta[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
        for port in template["spec"]["containers"][0].get("ports", []) or [{"name": ""}]:
            target = {**meta, "__meta_kubernetes_pod_container_port_name": port["name"]}
            if _kept(trainer["relabel_configs"], target):
                kept.append((role, port["name"]))
    assert kept == [("Worker", f"metrics-{i}") for i in range(4)]
    operator_job = jobs["fieldkube-all-operator"]["relabel_configs"]
    service_meta = {
        "__meta_kubernetes_service_label_app_kubernetes_io_instance": "fieldkube",
        "__meta_kubernetes_service_label_app_kubernetes_io_component": "operator",
    }
    assert _kept(operator_job, {**service_meta, "__meta_kubernetes_endpoint_port_name": "metrics"})
    assert not _kept(operator_job, {**service_meta, "__meta_kubernetes_endpoint_port_name": "health"})


def test_manifests_are_the_chart_rendered() -> None:
    stale = chart.stale_manifests(chart.MANIFESTS_DIR, chart.rendered_manifests())
    assert not stale, f"stale manifests (run `make manifests`): {stale}"


def test_the_local_cluster_finds_the_operator_account_in_manifests_rbac() -> None:
    """`make cluster` runs the operator as fieldkube-system/fieldkube-operator from manifests/rbac/."""
    docs = [
        d
        for p in sorted((chart.MANIFESTS_DIR / "rbac").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
    ]
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in by_kind(docs, "ServiceAccount")}
    assert accounts == {("fieldkube-system", "fieldkube-operator")}
    assert by_kind(docs, "Namespace")[0]["metadata"]["name"] == "fieldkube-system"
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "fieldkube-operator", "namespace": "fieldkube-system"}
    ]


def test_the_mlflow_server_as_the_chart_runs_it_accepts_its_service_name_and_no_other_host(
    tmp_path: Path,
) -> None:
    """The chart's own `mlflow server` arguments, run here on loopback with the pinned mlflow."""
    command = container(render(()), "-mlflow")["command"]
    port = free_port()
    replace = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--workers": "1",
        "--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination": str(tmp_path / "artifacts"),
    }
    assert command[0] == "mlflow"
    argv = [str(Path(sys.executable).parent / "mlflow")]  # the same mlflow release as the trainer image
    for arg in command[1:]:
        flag, _, _ = arg.partition("=")
        argv.append(f"{flag}={replace[flag]}" if flag in replace else arg)
    log = (tmp_path / "mlflow.log").open("w")
    # Its own process group: `mlflow server` runs uvicorn as a child process.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def status(host: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    try:
        wait_until("the MLflow server", lambda: _answers(port), 120)
        assert status("fieldkube-mlflow.fieldkube-system.svc:5000") == 200
        assert status("fieldkube-mlflow:5000") == 200
        assert status("attacker.example:5000") == 403
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _answers(port: int) -> bool:
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Host": "localhost"})
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_the_operators_own_namespace_label_survives_the_scrape() -> None:
    """The operator labels GPU-hours with each TrainingJob's namespace: both ways of scraping it honour
    the metric's labels, or Prometheus would rename it exported_namespace and put the operator's there."""
    docs = render((ALL_VALUES,))
    monitors = {m["metadata"]["name"]: m for m in by_kind(docs, "ServiceMonitor")}
    assert [e.get("honorLabels") for e in monitors["fieldkube-all-operator"]["spec"]["endpoints"]] == [True]
    assert [e.get("honorLabels") for e in monitors["fieldkube-all-serving"]["spec"]["endpoints"]] == [None]
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("scrape-configs")]
    config = yaml.safe_load(cm["data"]["fieldkube-scrape-configs.yaml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["fieldkube-all-operator"].get("honor_labels") is True
    assert "honor_labels" not in jobs["fieldkube-all-serving"]
