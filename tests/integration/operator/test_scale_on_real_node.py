"""`fieldkube-scale --cluster` on the local cluster's real node: a sweep of 1 and 2 workers as TrainingJobs.

Nothing is simulated: the sweep creates TrainingJobs from the shipped CPU example, the operator (its own
ServiceAccount, a host process) makes the MPIJobs, the real kubelet runs the trainer image's Horovod ranks
over ssh, and the sweep reads each job's images/s and loss curve from the MLflow server the pods log to,
found by the job's uid tag. A few steps each: this proves the path, it measures nothing
(bench/README.md records measured sweeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from fieldkube.localcluster.services import host_path_claim
from fieldkube.trainer import scale

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "manifests/examples/counter-cpu.yaml"
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_sweep_of_one_and_two_workers_as_training_jobs_reads_rates_from_mlflow(
    local_cluster: Any,
    real_node: Any,
    node_mlflow: str,
    field_dataset_root: Path,
    cluster_namespace: str,
    operator: Any,
    tmp_path: Path,
) -> None:
    host_path_claim(local_cluster, cluster_namespace, "field-images", field_dataset_root)
    out = tmp_path / "scale"
    result = scale.run(
        [
            "--cluster", "--template", str(EXAMPLE), "--kubeconfig", str(local_cluster.kubeconfig),
            "--namespace", cluster_namespace, "--mlflow-uri", node_mlflow, "--experiment", "scale-sweep",
            "--name-prefix", "sweep", "--workers", "1,2", "--launcher", "horovod", "--steps", "3",
            "--batch", "2", "--poll", "2", "--timeout", "300", "--out", str(out),
        ]
    )  # fmt: skip

    jobs = local_cluster.get_json("trainingjobs", namespace=cluster_namespace)["items"]
    phases = {j["metadata"]["name"]: (j.get("status") or {}).get("phase") for j in jobs}
    assert phases == {"sweep-horovod-w1": "Succeeded", "sweep-horovod-w2": "Succeeded"}, phases
    runs = result["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    assert all(r["images_per_second"] > 0 and r["backend"] == "horovod" for r in runs), runs
    assert all(len(r["loss_curves"][0]) == 3 for r in runs)  # train_loss at every step, from MLflow
    assert runs[1]["speedup"] == pytest.approx(
        runs[1]["images_per_second"] / runs[0]["images_per_second"], abs=2e-3
    )
    assert {"scale.json", "scale.md", "scale.csv", "scale.png"} <= {p.name for p in out.iterdir()}

    client = MlflowClient(tracking_uri=node_mlflow)
    artifacts = {a.path for a in client.list_artifacts(result["sweep_run_id"])}
    assert artifacts == {"scale.json", "scale.md", "scale.csv", "scale.png"}
    sweep_run = client.get_run(result["sweep_run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.params["backend"] == "horovod"
