"""`make demo-cluster`: the demo's training step through Kubernetes, on the local control plane.

It starts the real control plane of hack/cluster/ (etcd, kube-apiserver with TLS and RBAC, controller
manager, scheduler, the Kubeflow mpi-operator) with fake GPU nodes, starts fieldkube-operator under its
own least-privilege ServiceAccount, creates the volumes the examples mount, runs
`kubectl apply -f manifests/examples/` and follows `kubectl get tj -w` until every job has finished.

Pods are simulated: kwok plays the kubelet, so no container runs and no training happens inside them;
the TrainingJobs, MPIJobs, pods, scheduling decisions and status are real Kubernetes objects. (`make demo`
trains for real on this machine; the operator tests run a job's launcher command locally.)

    python hack/demo_cluster.py [--nodes 2] [--detach]    # Ctrl-C stops the cluster unless --detach
    python hack/demo_cluster.py down
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_STATE = Path(os.environ.get("FIELDKUBE_CACHE", Path.home() / ".cache" / "fieldkube")) / "demo-cluster"
NAMESPACE = "field-team"
SIMULATED = (
    "NOTE: pods are simulated by kwok (no container runtime runs here): nothing trains inside them. "
    "The TrainingJobs, MPIJobs, pods, scheduling and status you see are real Kubernetes objects."
)
TERMINAL = {"Succeeded", "Failed"}
START = time.monotonic()


def say(message: str) -> None:
    print(f"[demo-cluster {time.monotonic() - START:6.1f}s] {message}", flush=True)


def load_harness() -> ModuleType:
    name = "fieldkube_cluster_harness"
    spec = importlib.util.spec_from_file_location(name, ROOT / "hack" / "cluster" / "harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def volumes_for(example: dict[str, Any], state: Path) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume and a bound claim for each PVC an example mounts."""
    manifests: list[dict[str, Any]] = []
    spec = example.get("spec", {})
    for section in ("dataset", "checkpoint"):
        claim = spec.get(section, {}).get("pvc")
        if not claim:
            continue
        volume = f"{NAMESPACE}-{claim}"
        manifests.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": volume},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "hostPath": {"path": str(state / "volumes" / claim)},
                    "claimRef": {"namespace": NAMESPACE, "name": claim},
                },
            }
        )
        manifests.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": NAMESPACE},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": volume,
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            }
        )
    return manifests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def phases(cluster: Any) -> dict[str, str]:
    items = cluster.get_json("trainingjobs", namespace=NAMESPACE)["items"]
    return {item["metadata"]["name"]: item.get("status", {}).get("phase", "") for item in items}


def up(args: argparse.Namespace) -> int:
    harness = load_harness()
    say("building or reusing the control plane binaries (hack/build-cluster-bins.sh)")
    subprocess.run([str(ROOT / "hack" / "build-cluster-bins.sh")], check=True)
    cluster = harness.LocalCluster(args.state, nodes=args.nodes)
    if cluster.running():
        say("stopping the previous demo cluster")
        cluster.stop()
    say(
        "starting etcd, kube-apiserver, controller manager, scheduler, mpi-operator and kwok "
        f"({args.nodes} fake GPU nodes)"
    )
    cluster.start()
    kubeconfig = cluster.kubeconfig
    say(f"control plane ready: export KUBECONFIG={kubeconfig}")
    print(SIMULATED, flush=True)

    operator_kubeconfig = cluster.service_account_kubeconfig("fieldkube-system", "fieldkube-operator")
    cluster.spawn(
        "fieldkube-operator",
        [
            str(BIN / "fieldkube-operator"),
            "run",
            "--standalone",
            "--bind-address",
            "127.0.0.1",
            "--metrics-port",
            str(free_port()),
            "--health-port",
            str(free_port()),
        ],
        kubeconfig=operator_kubeconfig,
    )
    say(
        "fieldkube-operator started with its own ServiceAccount token (log: "
        f"{cluster.log_path('fieldkube-operator')})"
    )

    cluster.kubectl("create", "namespace", NAMESPACE)
    examples = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
    for path in examples:
        cluster.apply(volumes_for(yaml.safe_load(path.read_text()), args.state))
    say(f"kubectl apply -f manifests/examples/ -n {NAMESPACE}")
    kubectl = [str(cluster.binaries.path("kubectl")), "--kubeconfig", str(kubeconfig)]
    subprocess.run(
        [*kubectl, "apply", "-n", NAMESPACE, "-f", str(ROOT / "manifests" / "examples")], check=True
    )
    say(f"kubectl get tj -n {NAMESPACE} -w   (until every job finishes)")
    watch = subprocess.Popen([*kubectl, "get", "tj", "-n", NAMESPACE, "-w"])
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            current = phases(cluster)
            if current and all(phase in TERMINAL for phase in current.values()):
                break
            time.sleep(1)
        time.sleep(1)
    finally:
        watch.terminate()
        watch.wait(timeout=10)
    final = phases(cluster)
    print()
    subprocess.run(
        [*kubectl, "get", "tj,mpijobs,pods", "-n", NAMESPACE, "-o", "wide"],
        check=False,
    )
    print()
    print(SIMULATED)
    print(f"  kubeconfig : export KUBECONFIG={kubeconfig}")
    print(f"  try        : kubectl describe tj -n {NAMESPACE}; kubectl get tj -n {NAMESPACE} -o yaml")
    print(f"  logs       : {cluster.logs_dir}")
    unfinished = {name: phase for name, phase in final.items() if phase not in TERMINAL}
    if unfinished:
        say(f"jobs not finished after {args.timeout:.0f}s: {unfinished}")
    if args.detach:
        say("cluster left running; stop it with: make demo-cluster-down")
        return 1 if unfinished else 0
    say("cluster running; press Ctrl-C to stop it")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print()
    cluster.stop()
    say("stopped")
    return 1 if unfinished else 0


def down(args: argparse.Namespace) -> int:
    cluster = load_harness().LocalCluster(args.state)
    cluster.stop()
    say("demo cluster stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", choices=["up", "down"], default="up")
    parser.add_argument("--nodes", type=int, default=2, help="fake GPU nodes (8 GPUs each)")
    parser.add_argument("--detach", action="store_true", help="leave the cluster running and return")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="the cluster's state directory")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the jobs to finish")
    args = parser.parse_args(argv)
    return up(args) if args.command == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
