"""`helm install` of charts/fieldkube into the local cluster, with every pod on the real node.

Nothing is simulated: the operator runs in a pod from the project's operator image and talks to the API
server with its ServiceAccount (through the `kubernetes` Service), the MLflow server runs from the chart
on a volume, the inference service waits (not Ready) until the registry has a model. A TrainingJob
applied to that install trains in real pods, registers its model in the chart's MLflow and moves the
`champion` alias; the service loads it and counts a synthetic field image through its Service. `helm
uninstall` then removes everything but the CRD and the MLflow volume's claim.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from fieldkube.localcluster import chart
from fieldkube.localcluster.services import (
    TRAINER_UID,
    host_path_claim,
    host_path_volume,
    real_node_scheduling,
)
from fieldkube.vision.synthetic import make_field_image

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "manifests/examples/counter-cpu.yaml"
RELEASE = "fieldkube"  # names: fieldkube-operator, fieldkube-mlflow, fieldkube-serve


def helm(cluster: Any, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(chart.binaries().helm), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}\n{result.stdout}"
    return result


def install_values() -> dict[str, Any]:
    """Everything on the real node, images as imported (no registry), requests that fit 2 cores."""
    placement = {**real_node_scheduling(), "image": {"pullPolicy": "Never"}}
    small = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}
    return {
        "operator": {**placement, "replicaCount": 1, "resources": small},
        "mlflow": {**placement, "resources": small, "persistence": {"size": "1Gi"}},
        "serving": {
            **placement,
            "models": {"counter": "models:/fieldkube-counter@champion", "segmenter": ""},
            "pollIntervalSeconds": 5,
            "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "3Gi"}},
        },
    }


def rollout(cluster: Any, namespace: str, deployment: str, timeout: int = 600) -> None:
    """Wait until the Deployment is available; its pods described and their logs in the failure."""
    done = cluster.kubectl(
        "rollout", "status", f"deployment/{deployment}", "-n", namespace, f"--timeout={timeout}s",
        check=False, timeout=timeout + 30,
    )  # fmt: skip
    if done.returncode != 0:
        selector = f"app.kubernetes.io/instance={RELEASE}"
        described = cluster.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False).stdout
        logs = cluster.kubectl("logs", "-n", namespace, f"deployment/{deployment}", check=False).stdout
        pytest.fail(f"{deployment} not available:\n{described[-6000:]}\n{logs[-3000:]}")


def counted(url: str, image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    response = httpx.post(f"{url}/v1/count", content=buffer.getvalue(), timeout=60)
    assert response.status_code == 200, response.text
    return float(response.json()["count"])


def test_helm_install_trains_registers_promotes_and_serves_then_uninstalls(
    local_cluster: Any,
    real_node: Any,
    field_dataset_root: Path,
    cluster_namespace: str,
    tmp_path: Path,
) -> None:
    ns = cluster_namespace
    # The chart's MLflow claim binds to a host-path volume made for it (no dynamic provisioner here).
    host_path_volume(local_cluster, ns, f"{RELEASE}-mlflow", tmp_path / "mlflow", writable_by=TRAINER_UID)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(install_values()))
    helm(local_cluster, "install", RELEASE, str(chart.CHART_DIR), "--namespace", ns, "--values", str(values))

    for name in (f"{RELEASE}-operator", f"{RELEASE}-mlflow"):
        rollout(local_cluster, ns, name)
    serving = local_cluster.get_json("deployment", f"{RELEASE}-serve", namespace=ns)
    assert serving["status"].get("readyReplicas", 0) == 0, "the service is Ready before any model exists"

    # A TrainingJob through the installed operator: no tracking URI (the operator's default is the
    # chart's MLflow Service), promoted to the alias the service follows.
    host_path_claim(local_cluster, ns, "field-images", field_dataset_root)
    host_path_claim(local_cluster, ns, "field-checkpoints", tmp_path / "checkpoints", writable_by=TRAINER_UID)
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["mlflow"] = {"experiment": "chart-install", "alias": "champion"}
    doc["spec"]["training"]["train"].update({"epochs": 24, "lr": 1.5e-3})
    name = doc["metadata"]["name"]
    local_cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))

    def finished() -> dict[str, Any] | None:
        status: dict[str, Any] = local_cluster.get_json("trainingjob", name, namespace=ns).get("status", {})
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = local_cluster.wait_for("the TrainingJob to finish", finished, timeout=900, interval=2.0)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["registeredModel"]["name"] == "fieldkube-counter", status
    assert status["mlflow"]["runId"], status

    rollout(local_cluster, ns, f"{RELEASE}-serve")
    service = local_cluster.get_json("service", f"{RELEASE}-serve", namespace=ns)
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"  # via kube-proxy
    model = httpx.get(f"{url}/v2/models/counter", timeout=30).json()
    assert model["versions"] == [str(status["registeredModel"]["version"])], model

    truth = 40
    sample = make_field_image(np.random.default_rng(7), 448, 448, truth, hazards=())
    count = counted(url, sample.image)
    assert abs(count - truth) <= 0.15 * truth, f"counted {count:.1f} flowers, truth {truth}"

    helm(local_cluster, "uninstall", RELEASE, "--namespace", ns, "--wait", "--timeout", "300s")
    kept = [f"PersistentVolumeClaim/{RELEASE}-mlflow"]

    def release_objects() -> list[str]:
        kinds = "all,configmaps,serviceaccounts,roles,rolebindings,pvc"
        return [
            f"{o['kind']}/{o['metadata']['name']}"
            for o in local_cluster.get_json(kinds, namespace=ns)["items"]
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE
        ]

    # `--wait` returns once the Deployments are gone; their pods terminate within their grace period.
    try:
        local_cluster.wait_for("only the kept claim left", lambda: release_objects() == kept, 180, 2.0)
    except Exception:
        pytest.fail(f"left after helm uninstall: {release_objects()}")
    cluster_wide = local_cluster.kubectl(
        "get", "clusterroles,clusterrolebindings", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    ).stdout.split()
    assert not [n for n in cluster_wide if ns in n], cluster_wide
    assert local_cluster.kubectl("get", "crd", "trainingjobs.fieldkube.io", "-o", "name").stdout.strip()
