"""`helm install` of charts/fieldkube into the local cluster, with every pod on the real node.

Nothing is simulated: the operator runs in a pod from the project's operator image and talks to the API
server with its ServiceAccount (through the `kubernetes` Service), the MLflow server runs from the chart
on a volume, the inference service waits (not Ready) until the registry has a model. A TrainingJob
applied to that install trains in real pods, registers its model in the chart's MLflow and moves the
`champion` alias; the service loads it and counts a synthetic field image through its Service. `helm
uninstall` then removes everything but the CRD and the MLflow volume's claim.

Monitoring as the chart installs it: a real Prometheus scrapes the targets that the chart's ServiceMonitors
and PodMonitor select (resolved by fieldkube.localcluster.monitors: Debian's Prometheus has no Kubernetes
discovery and no Prometheus operator runs here) and evaluates the chart's PrometheusRule. Every component
of the install must have answered its scrapes (operator, service, each training rank), every rule must
evaluate, and every dashboard panel and alert must have data over the run, or be listed below with the
reason it cannot here.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from fieldkube.localcluster import chart, monitors
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
JOB_LABEL, ROLE_LABEL = "training.kubeflow.org/job-name", "training.kubeflow.org/job-role"
RELEASE = "fieldkube"  # names: fieldkube-operator, fieldkube-mlflow, fieldkube-serve
SCRAPE_S = 2
# What cannot have data in this install, and why. A panel or alert missing from here must have data; one
# listed here that has data fails too, so the list stays true.
NO_GPU = "DCGM exporter series: no GPU and no DCGM exporter here"
EMPTY_PANELS = {
    "fieldkube-gpu": dict.fromkeys(
        ("GPU utilisation", "Mean GPU utilisation by pod", "Framebuffer used", "Power"), NO_GPU
    ),
    "fieldkube-operator": {
        "GPU-hours by namespace (last 24 h)": "the install's one TrainingJob is a CPU job: no GPU-seconds"
    },
    "fieldkube-training": {"MFU": "CPU training: no peak FLOP/s to divide by (runtime.peak_tflops unset)"},
}
EMPTY_ALERTS = {"FieldkubeGpuIdleDuringTraining": NO_GPU}


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
        "monitoring": {"prometheusOperator": {"enabled": True, "interval": f"{SCRAPE_S}s"}},
        "serving": {
            **placement,
            "models": {"counter": "models:/fieldkube-counter@champion", "segmenter": ""},
            "pollIntervalSeconds": 5,
            "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "3Gi"}},
        },
    }


def rollout(cluster: Any, namespace: str, deployment: str, timeout: int = 600) -> None:
    """Wait until the Deployment is available; its pods described and their logs in the failure.

    Its Available condition, not `kubectl rollout status`: the service's pod waits (not Ready) for its first
    model while the job trains, which can outlast the Deployment's 600 s progress deadline; `rollout status`
    then fails at once on ProgressDeadlineExceeded, though the pod turns Ready as soon as the model exists."""
    done = cluster.kubectl(
        "wait", "--for=condition=Available", f"deployment/{deployment}", "-n", namespace,
        f"--timeout={timeout}s", check=False, timeout=timeout + 30,
    )  # fmt: skip
    if done.returncode != 0:
        selector = f"app.kubernetes.io/instance={RELEASE}"
        described = cluster.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False).stdout
        logs = cluster.kubectl("logs", "-n", namespace, f"deployment/{deployment}", check=False).stdout
        mlflow = cluster.kubectl(
            "logs", "-n", namespace, f"deployment/{RELEASE}-mlflow", "--tail=40", check=False
        ).stdout  # what the registry server said meanwhile (the service's models come from it)
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        pytest.fail(
            f"{deployment} not available ({(done.stdout + done.stderr).strip()}):\n"
            f"{described[-6000:]}\n{logs[-3000:]}\n--- pods ---\n{pods}"
            f"\n--- {RELEASE}-mlflow ---\n{mlflow[-3000:]}"
        )


def counted(url: str, image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    response = httpx.post(f"{url}/v1/count", content=buffer.getvalue(), timeout=60)
    assert response.status_code == 200, response.text
    return float(response.json()["count"])


def test_helm_install_trains_registers_promotes_and_serves_then_uninstalls(
    local_cluster: Any,
    real_node: Any,
    prometheus_operator_crds: None,
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

    # Prometheus, configured from the chart's monitoring objects, from now until the end of the run.
    discovery = monitors.FileDiscovery(local_cluster, ns, tmp_path / "file-sd", interval=SCRAPE_S)
    with discovery:
        prometheus = monitors.start_prometheus(
            local_cluster,
            tmp_path / "prometheus",
            discovery.directory,
            monitors.prometheus_rules(local_cluster, ns),
            interval=SCRAPE_S,
        )
        try:
            started = time.time()
            name = train_and_serve(local_cluster, ns, field_dataset_root, tmp_path)
            check_monitoring(prometheus, discovery, ns, name, started, tmp_path)
        finally:
            local_cluster.stop_process("prometheus")
    uninstall(local_cluster, ns)


def train_and_serve(local_cluster: Any, ns: str, field_dataset_root: Path, tmp_path: Path) -> str:
    """The TrainingJob survives a killed worker, trains, promotes; the service counts well. Its name."""
    status, name = train_through_a_killed_worker(local_cluster, ns, field_dataset_root, tmp_path)

    rollout(local_cluster, ns, f"{RELEASE}-serve")
    url = service_url(local_cluster, ns, f"{RELEASE}-serve")  # via kube-proxy
    model = httpx.get(f"{url}/v2/models/counter", timeout=30).json()
    assert model["versions"] == [str(status["registeredModel"]["version"])], model

    truth = 40
    sample = make_field_image(np.random.default_rng(7), 448, 448, truth, hazards=())
    count = counted(url, sample.image)
    assert abs(count - truth) <= 0.15 * truth, f"counted {count:.1f} flowers, truth {truth}"
    for _ in range(3):  # requests over several scrapes, so that rate() has two points or more
        time.sleep(SCRAPE_S)
        counted(url, sample.image)
    return name


def train_through_a_killed_worker(
    local_cluster: Any, ns: str, field_dataset_root: Path, tmp_path: Path
) -> tuple[dict[str, Any], str]:
    """The shipped CPU example through the installed operator, one worker pod deleted once the first
    checkpoint is on the volume: the launcher fails, the Job retries it, the mpi-operator recreates the
    worker, and the second launcher's ranks resume from that checkpoint and end with the exact step count.
    No tracking URI: the operator's default is the chart's MLflow Service; promoted to the alias the
    service follows. Returns the final status and the job's name."""
    host_path_claim(local_cluster, ns, "field-images", field_dataset_root)
    checkpoints = tmp_path / "checkpoints"
    host_path_claim(local_cluster, ns, "field-checkpoints", checkpoints, writable_by=TRAINER_UID)
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["mlflow"] = {"experiment": "chart-install", "alias": "champion"}
    doc["spec"]["training"]["train"].update({"epochs": 24, "lr": 1.5e-3})
    name = str(doc["metadata"]["name"])
    local_cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))

    def launcher_pods(job: str) -> list[dict[str, Any]]:
        selector = f"{JOB_LABEL}={job},{ROLE_LABEL}=launcher"
        pods = local_cluster.get_json("pods", "-l", selector, namespace=ns)["items"]
        return sorted(pods, key=lambda p: str(p["metadata"]["creationTimestamp"]))

    def logs_of(job: str) -> str:
        """The job's status and its launchers' last log lines, for a failure message."""
        texts = [
            local_cluster.kubectl("logs", p["metadata"]["name"], "-n", ns, check=False).stdout[-2500:]
            for p in launcher_pods(job)
        ]
        return "\n=====\n".join(["", *texts])

    job_dir = checkpoints / doc["spec"]["checkpoint"]["path"]

    def checkpointed() -> bool:
        if any(job_dir.glob("ckpt-*.pt")):
            return True
        status = local_cluster.get_json("trainingjob", name, namespace=ns).get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            pytest.fail(f"ended before its first checkpoint: {json.dumps(status, indent=1)}{logs_of(name)}")
        return False

    try:
        local_cluster.wait_for("the first checkpoint", checkpointed, 600, 1.0)
    except Exception as error:
        pytest.fail(f"{error}{logs_of(name)}")
    local_cluster.kubectl("delete", "pod", f"{name}-worker-1", "-n", ns, "--grace-period=0", "--force")

    def finished() -> dict[str, Any] | None:
        status: dict[str, Any] = local_cluster.get_json("trainingjob", name, namespace=ns).get("status", {})
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = local_cluster.wait_for("the TrainingJob to finish", finished, timeout=1200, interval=2.0)
    launchers = launcher_pods(name)
    logs = [
        local_cluster.kubectl("logs", p["metadata"]["name"], "-n", ns, check=False).stdout for p in launchers
    ]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + "\n=====\n".join(
        t[-2500:] for t in logs
    )
    # The run policy retried the launcher, and the retry resumed from the checkpoint, not from step 0.
    assert len(launchers) == 2, [p["metadata"]["name"] for p in launchers]
    log = logs[-1]
    resumed = re.findall(r"resuming from \S+ \(step (\d+)\)", log)
    assert resumed and int(resumed[0]) > 0 and "resumed at step" in log, log[-3000:]
    # Both ranks ran (mpirun --tag-output prefixes each line with [job,rank]), on the real node.
    assert re.search(r"\[1,0\]<", log) and re.search(r"\[1,1\]<", log), log[-3000:]
    assert {p["spec"]["nodeName"] for p in launchers} == {"fieldkube-node"}

    # Progress came from the MLflow run (the exact step count), and the model was registered there.
    assert status["progress"]["step"] == expected_steps(field_dataset_root, doc["spec"]), status["progress"]
    mlflow = service_url(local_cluster, ns, f"{RELEASE}-mlflow")
    host = f"{RELEASE}-mlflow.{ns}.svc:{mlflow.rsplit(':', 1)[1]}"
    run = mlflow_json(mlflow, host, "runs/get", run_id=status["mlflow"]["runId"])["run"]
    assert run["info"]["status"] == "FINISHED", run["info"]
    registered = status["registeredModel"]
    assert registered["name"] == "fieldkube-counter", status
    version = mlflow_json(
        mlflow, host, "model-versions/get", name=registered["name"], version=registered["version"]
    )
    assert version["model_version"]["run_id"] == run["info"]["run_id"]
    assert "champion" in version["model_version"].get("aliases", []), version
    return status, name


def expected_steps(dataset_root: Path, spec: dict[str, Any]) -> int:
    """Optimizer steps of the whole run: epochs × steps per epoch over every rank's share of the tiles."""
    from fieldkube.trainer.loader import steps_per_epoch

    manifest = json.loads((dataset_root / spec["dataset"]["path"] / "manifest.json").read_text())
    train_size = int(manifest["splits"]["train"]["rows"])  # prepared with --no-balance: every tile
    train = spec["training"]["train"]
    return int(train["epochs"]) * steps_per_epoch(train_size, int(train["batch_size"]) * int(spec["workers"]))


def service_url(local_cluster: Any, ns: str, name: str) -> str:
    """The Service's ClusterIP address, which the host reaches through kube-proxy."""
    service = local_cluster.get_json("service", name, namespace=ns)
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


def mlflow_json(url: str, host: str, path: str, **params: str) -> dict[str, Any]:
    """GET an MLflow REST path. ``host``: the Host header, one of the names the chart's MLflow allows (its
    Service's DNS names: MLflow 3 refuses any other Host, such as the bare ClusterIP, with 403)."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}", headers={"Host": host}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def query(prometheus: str, expr: str, at: float) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def check_monitoring(
    prometheus: str, discovery: monitors.FileDiscovery, ns: str, job_name: str, started: float, tmp_path: Path
) -> None:
    """Every component was scraped, every rule evaluates, every panel and alert has data (or a reason)."""
    time.sleep(3 * SCRAPE_S)  # the last requests' samples scraped
    ended = time.time()
    window = f"{int(ended - started) + 1}s"
    answered = {
        (s["metric"]["job"], s["metric"].get("pod", ""))
        for s in query(prometheus, f"max_over_time(up[{window}]) == 1", ended)
    }
    jobs = {job for job, _ in answered}
    assert {f"{RELEASE}-operator-metrics", f"{RELEASE}-serve"} <= jobs, (answered, discovery.seen)
    ranks = sorted(pod for job, pod in answered if job == f"{ns}/{RELEASE}-trainer")
    assert ranks == [f"{job_name}-worker-0", f"{job_name}-worker-1"], (answered, discovery.seen)
    assert discovery.last_error is None, discovery.last_error
    # Each rank's own series (one rank per worker pod): scraped while it trained, not only `up`.
    steps = query(prometheus, f"max_over_time(fieldkube_train_steps_total[{window}])", ended)
    assert {s["metric"].get("rank") for s in steps} == {"0", "1"}, steps

    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=30) as response:
        groups = json.loads(response.read())["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(alert_names()), rules.keys()
    assert all(r["health"] == "ok" for r in rules.values()), [
        r for r in rules.values() if r["health"] != "ok"
    ]

    # An alert has data when its expression, without its threshold, has a series at some point of the run.
    empty_alerts = {}
    for alert, rule in rules.items():
        measured = rule["query"].rsplit(" > ", 1)[0].rsplit(" < ", 1)[0]
        if not query(prometheus, f"max_over_time(({measured})[{window}:{SCRAPE_S}s])", ended):
            empty_alerts[alert] = measured
    assert set(empty_alerts) == set(EMPTY_ALERTS), empty_alerts

    report = tmp_path / "panels.json"
    drawn = subprocess.run(
        [sys.executable, str(ROOT / "hack/render_dashboards.py"), "--prometheus", prometheus,
         "--out", str(tmp_path / "dashboards"), "--minutes", f"{(ended - started) / 60:.2f}",
         "--report", str(report)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr
    empty_panels = {
        board: sorted(title for title, n in counts.items() if n == 0)
        for board, counts in json.loads(report.read_text()).items()
    }
    expected = {board: sorted(EMPTY_PANELS.get(board, {})) for board in empty_panels}
    assert empty_panels == expected, drawn.stdout


def alert_names() -> list[str]:
    rules = yaml.safe_load((chart.CHART_DIR / "files/prometheus-rules.yaml").read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def uninstall(local_cluster: Any, ns: str) -> None:
    """`helm uninstall` leaves the MLflow claim (resource-policy keep) and the CRD, and nothing else."""
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
