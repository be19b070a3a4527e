"""What a TrainingJob on the real node needs besides the cluster: MLflow, volumes, the operator.

Shared by the end-to-end tests, `make demo-cluster` and the benchmarks, so each sets up a real-node
training run the same way:

- an MLflow tracking server (SQLite + artifacts proxied over HTTP, so pods need no shared files) bound
  to the real node's gateway address, the one host address pods can reach;
- host-path PersistentVolumes bound to named claims, for the prepared dataset (read-only) and the
  checkpoints (written by the trainer's uid);
- the fieldkube operator under its own ServiceAccount, telling trainers where MLflow is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldkube.localcluster.node import NODE_IP, NODE_LABEL, NODE_LABEL_VALUE
from fieldkube.localcluster.procs import ClusterError, free_port

if TYPE_CHECKING:
    from fieldkube.localcluster.harness import LocalCluster

TRAINER_UID = 1000  # the trainer image's user (images/trainer/Dockerfile)
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"{name} is not installed in {BIN} nor on PATH (run make dev)")
    return found


def start_mlflow(cluster: LocalCluster, root: Path, name: str = "mlflow") -> str:
    """Start an MLflow server on the real node's gateway address; returns its URI.

    It is a process of the cluster (stopped with it). Artifacts go through the server
    (``--artifacts-destination``), so trainers in pods upload models over HTTP.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://{NODE_IP}:{port}"
    cluster.spawn(
        name,
        [
            _tool("mlflow"),
            "server",
            "--host",
            NODE_IP,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            # Pods address the server by this IP: allow it as a Host header.
            "--allowed-hosts",
            f"{NODE_IP}:{port},{NODE_IP},localhost,127.0.0.1",
        ],
    )
    cluster.wait_http(name, f"{uri}/health", timeout=180)
    return uri


def host_path_volume(
    cluster: LocalCluster,
    namespace: str,
    claim: str,
    path: Path,
    *,
    size: str = "10Gi",
    writable_by: int | None = None,
) -> str:
    """A PersistentVolume on the real node's ``path``, reserved for claim ``namespace/claim``; its name.

    The claim may be made later by anyone (a Helm chart's PVC binds to it: there is no dynamic
    provisioner here). With ``writable_by`` the directory is owned by that uid, since host paths get no
    ``fsGroup`` ownership change. The volume has no node affinity: pods on the fake GPU nodes may
    claim it too (they are simulated and mount nothing); jobs meant for real pods select the real node.
    """
    path.mkdir(parents=True, exist_ok=True)
    if writable_by is not None:
        os.chown(path, writable_by, writable_by)
    # PersistentVolumes are cluster-wide: named by the claim and a hash of its namespace (names <= 63).
    volume = f"{claim[:50]}-{hashlib.sha256(namespace.encode()).hexdigest()[:8]}"
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"fieldkube.io/claim-namespace": namespace}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim},
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
    )
    return volume


def host_path_claim(
    cluster: LocalCluster,
    namespace: str,
    claim: str,
    path: Path,
    *,
    size: str = "10Gi",
    writable_by: int | None = None,
) -> dict[str, Any]:
    """:func:`host_path_volume` and its claim ``namespace/claim`` (ReadWriteMany), bound at once."""
    volume = host_path_volume(cluster, namespace, claim, path, size=size, writable_by=writable_by)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": size}},
            },
        }
    )
    return {"volume": volume, "claim": claim, "path": str(path)}


def real_node_scheduling() -> dict[str, Any]:
    """The TrainingJob ``spec.scheduling`` that puts a CPU job on the real node."""
    return {
        "nodeSelector": {NODE_LABEL: NODE_LABEL_VALUE},
        "tolerations": [
            {"key": NODE_LABEL, "operator": "Equal", "value": NODE_LABEL_VALUE, "effect": "NoSchedule"}
        ],
    }


def prepare_cpu_example_dataset(root: Path) -> Path:
    """The dataset manifests/examples/counter-cpu.yaml reads: ``root/prepared/field-small``, made once.

    16 synthetic field images of 224x448 (24 training tiles), every file world-readable, since the
    trainer's uid reads it through a host-path volume.
    """
    out = root / "prepared" / "field-small"
    if not (out / "manifest.json").exists():
        argv = [
            _tool("fieldkube-prepare"),
            "--synthetic",
            "field",
            "--num-images",
            "16",
            "--image-size",
            "224x448",
            "--split",
            "70/30",
            "--workers",
            "1",
            "--seed",
            "1",
            "--no-balance",
            "--out",
            str(out),
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise ClusterError(
                f"fieldkube-prepare failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out
