"""TrainingJobs that train for real: real launcher and worker pods on the local cluster's real node.

Nothing is simulated here: the operator (its own ServiceAccount) makes the MPIJob, the real
mpi-operator makes the launcher Job and the worker pods, the real kubelet runs them with containerd
from the project's trainer image, the launcher's `mpirun` reaches both workers over ssh (port 2222,
non-root), two Horovod ranks train on a prepared dataset on a volume, and the trainer registers the
model in a real MLflow server that the pods reach over the node's bridge.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fieldkube.localcluster.services import TRAINER_UID, host_path_claim

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "manifests/examples/counter-cpu.yaml"
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def example(mlflow_uri: str, **changes: Any) -> dict[str, Any]:
    """The shipped CPU example, pointed at the test's MLflow server, with ``changes`` merged into spec."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["mlflow"]["trackingUri"] = mlflow_uri
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


def volumes(cluster: Any, namespace: str, dataset_root: Path, tmp_path: Path) -> Path:
    """The example's two claims: the prepared dataset (read-only) and checkpoints (trainer-writable)."""
    host_path_claim(cluster, namespace, "field-images", dataset_root)
    checkpoints = tmp_path / "checkpoints"
    host_path_claim(cluster, namespace, "field-checkpoints", checkpoints, writable_by=TRAINER_UID)
    return checkpoints


def pods(cluster: Any, namespace: str, name: str, role: str) -> list[dict[str, Any]]:
    got = cluster.get_json(
        "pods",
        "-l",
        f"training.kubeflow.org/job-name={name},training.kubeflow.org/job-role={role}",
        namespace=namespace,
    )
    return list(got["items"])


class RankScraper(threading.Thread):
    """Scrapes every rank's /metrics on the worker pods (by pod IP over the bridge) while the job runs."""

    def __init__(self, cluster: Any, namespace: str, name: str, port: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.name, self.port = cluster, namespace, name, port
        self.scraped: dict[str, str] = {}
        self.nodes: dict[str, str] = {}  # worker pod -> node, as seen while it ran
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for pod in pods(self.cluster, self.namespace, self.name, "worker"):
                    self.nodes[pod["metadata"]["name"]] = pod["spec"].get("nodeName", "")
                    ip = pod.get("status", {}).get("podIP")
                    if not ip:
                        continue
                    url = f"http://{ip}:{self.port}/metrics"
                    try:
                        text = httpx.get(url, timeout=2).text
                    except httpx.HTTPError:
                        continue
                    if "fieldkube_train" in text:
                        self.scraped[pod["metadata"]["name"]] = text
            except Exception:  # the cluster is read again on the next round
                pass
            self.stop.wait(1.0)


def mlflow_json(uri: str, path: str, **params: str) -> dict[str, Any]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{path}?{query}", timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def expected_steps(dataset_root: Path, spec: dict[str, Any]) -> int:
    from fieldkube.trainer.loader import steps_per_epoch

    manifest = json.loads((dataset_root / spec["dataset"]["path"] / "manifest.json").read_text())
    train_size = int(manifest["splits"]["train"]["rows"])  # prepared with --no-balance: every tile
    train = spec["training"]["train"]
    return int(train["epochs"]) * steps_per_epoch(train_size, int(train["batch_size"]) * int(spec["workers"]))


def test_cpu_example_trains_in_real_pods_survives_a_killed_worker_and_registers_the_model(
    local_cluster: Any,
    real_node: Any,
    node_mlflow: str,
    field_dataset_root: Path,
    cluster_namespace: str,
    job_watcher: Any,
    tmp_path: Path,
) -> None:
    """The shipped example, with one more epoch, and a worker pod deleted once the first checkpoint is on
    the volume: the launcher fails, the Job retries it, the mpi-operator recreates the worker, and the
    second launcher's ranks resume from that checkpoint and finish with the exact step count."""
    checkpoints = volumes(local_cluster, cluster_namespace, field_dataset_root, tmp_path)
    doc = example(node_mlflow)
    doc["spec"]["training"]["train"]["epochs"] += 1
    name = doc["metadata"]["name"]
    local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump(doc))
    from fieldkube.operator import names

    scraper = RankScraper(local_cluster, cluster_namespace, name, names.METRICS_PORT)
    scraper.start()
    try:
        job_dir = checkpoints / doc["spec"]["checkpoint"]["path"]
        local_cluster.wait_for(
            "the first checkpoint on the volume",
            lambda: any(job_dir.glob("ckpt-*.pt")),
            timeout=600,
            interval=1.0,
        )
        local_cluster.kubectl(
            "delete", "pod", f"{name}-worker-1", "-n", cluster_namespace, "--grace-period=0", "--force"
        )
        status = job_watcher.wait(
            cluster_namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), 900
        )
    finally:
        scraper.stop.set()
        scraper.join(timeout=10)
    launchers = sorted(
        pods(local_cluster, cluster_namespace, name, "launcher"),
        key=lambda p: str(p["metadata"]["creationTimestamp"]),
    )
    logs = [
        local_cluster.kubectl("logs", p["metadata"]["name"], "-n", cluster_namespace, check=False).stdout
        for p in launchers
    ]
    log = logs[-1]
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n" + "\n=====\n".join(
        text[-2500:] for text in logs
    )
    # The run policy retried the launcher, and the retry resumed from the checkpoint, not from step 0.
    assert len(launchers) == 2, [p["metadata"]["name"] for p in launchers]
    resumed = re.findall(r"resuming from \S+ \(step (\d+)\)", log)
    assert resumed and int(resumed[0]) > 0, log[-3000:]
    assert "resumed at step" in log, log[-3000:]

    # Both ranks ran (mpirun --tag-output prefixes each line with [job,rank]) on the real node.
    assert re.search(r"\[1,0\]<", log) and re.search(r"\[1,1\]<", log), log[-3000:]
    # The workers (deleted when the job ended: cleanPodPolicy Running) and the launcher ran on the real node.
    workers = [f"{name}-worker-{i}" for i in range(doc["spec"]["workers"])]
    assert sorted(scraper.nodes) == workers
    assert {*scraper.nodes.values(), *(p["spec"]["nodeName"] for p in launchers)} == {"fieldkube-node"}
    # Every rank's /metrics was scraped while it ran (one rank per worker pod here).
    assert sorted(scraper.scraped) == workers, scraper.scraped.keys()
    ranks = {
        rank
        for text in scraper.scraped.values()
        for rank in re.findall(r'fieldkube_train_steps_total\{[^}]*rank="(\d+)"', text)
    }
    assert ranks == {"0", "1"}, next(iter(scraper.scraped.values()))[:2000]

    # Progress came from the MLflow run, and the model was registered there.
    assert status["progress"]["step"] == expected_steps(field_dataset_root, doc["spec"]), status["progress"]
    run_id = status["mlflow"]["runId"]
    run = mlflow_json(node_mlflow, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    registered = status["registeredModel"]
    version = mlflow_json(
        node_mlflow, "model-versions/get", name=registered["name"], version=registered["version"]
    )["model_version"]
    assert version["run_id"] == run_id and "candidate" in version.get("aliases", [])


def test_missing_dataset_ends_failed_with_pod_exit_code_and_the_trainers_error(
    local_cluster: Any,
    real_node: Any,
    node_mlflow: str,
    field_dataset_root: Path,
    cluster_namespace: str,
    job_watcher: Any,
    tmp_path: Path,
) -> None:
    volumes(local_cluster, cluster_namespace, field_dataset_root, tmp_path)
    doc = example(
        node_mlflow,
        dataset={"pvc": "field-images", "path": "prepared/does-not-exist"},
        runPolicy={"backoffLimit": 0},
    )
    name = doc["metadata"]["name"]
    local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump(doc))
    status = job_watcher.wait(
        cluster_namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), 600
    )
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    diagnosis = status["diagnosis"]
    assert diagnosis["role"] == "launcher" and diagnosis["pod"].startswith(f"{name}-launcher")
    assert diagnosis["exitCode"] not in (None, 0)
    text = " ".join([status.get("message", ""), diagnosis.get("message", ""), *diagnosis.get("logTail", [])])
    assert "/data/prepared/does-not-exist" in text, json.dumps(status, indent=1)
