"""Every object the chart renders is accepted by the real API server (server-side dry run).

The prometheus-operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) come from its pinned Go module
(the `prometheus_operator_crds` fixture); the TrainingJob CRD is applied by
the local cluster from manifests/crd/ at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldkube.localcluster import chart

ALL_VALUES = chart.CHART_DIR / "ci" / "all-values.yaml"


def dry_run(local_cluster: Any, stream: str) -> list[str]:
    """Server-side dry run of a rendered stream; returns kubectl's lines (one per object)."""
    result = local_cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=helm",
        "-f",
        "-",
        input=stream,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("values_file", [None, ALL_VALUES], ids=["defaults", "all-values"])
def test_every_rendered_object_passes_a_server_side_dry_run(
    local_cluster: Any,
    cluster_namespace: str,
    prometheus_operator_crds: None,
    values_file: Path | None,
    tmp_path: Path,
) -> None:
    values: list[Path] = []
    if values_file is not None:
        # The namespaces that all-values.yaml names, made unique to this test and created.
        watched = [f"{cluster_namespace}-a", f"{cluster_namespace}-b"]
        dashboards = f"{cluster_namespace}-grafana"
        for name in [*watched, dashboards]:
            local_cluster.create_namespace(name)
        overrides = tmp_path / "namespaces.yaml"
        overrides.write_text(
            yaml.safe_dump(
                {
                    "operator": {"watchNamespaces": watched},
                    "monitoring": {"dashboards": {"namespace": dashboards}},
                }
            )
        )
        values = [values_file, overrides]
    stream = chart.template("fieldkube", cluster_namespace, values, include_crds=True)
    docs = [d for d in yaml.safe_load_all(stream) if d]
    try:
        lines = dry_run(local_cluster, stream)
    finally:
        if values_file is not None:
            for name in [*watched, dashboards]:
                local_cluster.delete_namespace(name)
    assert len(lines) == len(docs), lines
    assert all("serverside-applied (server dry run)" in line for line in lines), lines
    kinds = {d["kind"] for d in docs}
    expected = {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "ConfigMap",
    }
    if values_file is None:
        expected |= {"PersistentVolumeClaim"}
    else:
        expected |= {
            "HorizontalPodAutoscaler",
            "ServiceMonitor",
            "PodMonitor",
            "PrometheusRule",
        }
    assert expected <= kinds, expected - kinds


def test_the_api_server_rejects_what_the_dry_run_would_catch(
    local_cluster: Any, cluster_namespace: str
) -> None:
    """The dry run above can fail: a rendered Deployment with a bad field is refused, naming the field."""
    stream = chart.template("fieldkube", cluster_namespace)
    docs = [d for d in yaml.safe_load_all(stream) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    result = local_cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-", input=yaml.safe_dump(deployment), check=False
    )
    assert result.returncode != 0 and "ports[0].containerPort" in result.stderr, result.stderr
