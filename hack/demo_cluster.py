"""`make demo-cluster`: the TrainingJob flow through Kubernetes, on the local cluster.

It starts the local cluster (etcd, kube-apiserver with TLS and RBAC, controller manager, scheduler, the
Kubeflow mpi-operator, fake GPU nodes and the real node: containerd, kubelet, kube-proxy, CoreDNS), an
MLflow server the pods reach, fieldkube-operator under its own least-privilege ServiceAccount, prepares a
small dataset, creates the volumes the examples mount, runs `kubectl apply -f manifests/examples/` and
follows `kubectl get tj -w` until every job has finished.

flower-counter-cpu trains for real: its launcher runs mpirun over ssh into two worker pods, in containers
from the project's images (`make images`), and registers its model in MLflow. The GPU examples' pods are
simulated by kwok on fake GPU nodes (there is no GPU here); their objects and status are real.

    python hack/demo_cluster.py [--nodes 2] [--detach]    # Ctrl-C stops the cluster unless --detach
    python hack/demo_cluster.py down
"""

from __future__ import annotations

import argparse
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
CPU_JOB = "flower-counter-cpu"
SIMULATED = (
    f"NOTE: {CPU_JOB} trains for real: its launcher and worker pods run in containers on the real node "
    "(fieldkube-node). The GPU examples' pods are simulated by kwok on fake GPU nodes (no GPU here): "
    "nothing trains inside them, but their TrainingJobs, MPIJobs, pods, scheduling and status are real "
    "Kubernetes objects."
)
TERMINAL = {"Succeeded", "Failed"}
START = time.monotonic()


def say(message: str) -> None:
    print(f"[demo-cluster {time.monotonic() - START:6.1f}s] {message}", flush=True)


def load_harness() -> ModuleType:
    from fieldkube.localcluster import harness

    return harness


def claims_of(example: dict[str, Any]) -> list[tuple[str, bool]]:
    """(claim, written by the trainer) for each PVC an example mounts."""
    spec = example.get("spec", {})
    return [
        (spec[section]["pvc"], section == "checkpoint")
        for section in ("dataset", "checkpoint")
        if spec.get(section, {}).get("pvc")
    ]


def prepare_cpu_dataset(data: Path) -> None:
    """The CPU example's dataset (prepared/field-small in the field-images claim), prepared once."""
    from fieldkube.localcluster.services import prepare_cpu_example_dataset

    say("preparing (or reusing) a small synthetic field dataset for flower-counter-cpu (fieldkube-prepare)")
    prepare_cpu_example_dataset(data / "field-images")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def phases(cluster: Any) -> dict[str, str]:
    items = cluster.get_json("trainingjobs", namespace=NAMESPACE)["items"]
    return {item["metadata"]["name"]: item.get("status", {}).get("phase", "") for item in items}


def up(args: argparse.Namespace) -> int:
    from fieldkube.localcluster.services import TRAINER_UID, host_path_claim, start_mlflow

    harness = load_harness()
    say("building or reusing the control plane binaries (hack/build-cluster-bins.sh)")
    subprocess.run([str(ROOT / "hack" / "build-cluster-bins.sh")], check=True)
    cluster = harness.LocalCluster(args.state, nodes=args.nodes, real_node=True)
    if cluster.running() or cluster._processes:
        say("stopping the previous demo cluster")
        cluster.stop()
    say(
        "starting etcd, kube-apiserver, controller manager, scheduler, mpi-operator, kwok "
        f"({args.nodes} fake GPU nodes) and the real node (containerd, kubelet, kube-proxy, CoreDNS)"
    )
    cluster.start()
    kubeconfig = cluster.kubeconfig
    say(f"cluster ready: export KUBECONFIG={kubeconfig}")
    print(SIMULATED, flush=True)

    data = args.state.with_name(args.state.name + "-data")  # outlives the cluster's state directory
    mlflow_uri = start_mlflow(cluster, data / "mlflow")
    say(f"MLflow server for the pods: {mlflow_uri}")
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
            "--mlflow-tracking-uri",
            mlflow_uri,
        ],
        kubeconfig=operator_kubeconfig,
    )
    say(
        "fieldkube-operator started with its own ServiceAccount token (log: "
        f"{cluster.log_path('fieldkube-operator')})"
    )

    cluster.kubectl("create", "namespace", NAMESPACE)
    prepare_cpu_dataset(data / "volumes")
    examples = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
    claims: dict[str, bool] = {}
    for path in examples:
        for claim, written in claims_of(yaml.safe_load(path.read_text())):
            claims[claim] = claims.get(claim, False) or written
    for claim, written in sorted(claims.items()):
        host_path_claim(
            cluster, NAMESPACE, claim, data / "volumes" / claim, writable_by=TRAINER_UID if written else None
        )
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
    print(
        f"  real pods  : kubectl logs -n {NAMESPACE} -l training.kubeflow.org/job-name={CPU_JOB},"
        "training.kubeflow.org/job-role=launcher"
    )
    print(f"  MLflow     : {mlflow_uri}  (runs, and the registered model fieldkube-counter)")
    print(f"  logs       : {cluster.logs_dir}")
    unfinished = {name: phase for name, phase in final.items() if phase not in TERMINAL}
    failed = {name: phase for name, phase in final.items() if phase == "Failed"}
    if unfinished:
        say(f"jobs not finished after {args.timeout:.0f}s: {unfinished}")
    if failed:
        say(f"jobs failed: {sorted(failed)} (kubectl describe tj -n {NAMESPACE} says why)")
    code = 1 if unfinished or failed else 0
    if args.detach:
        say("cluster left running; stop it with: make demo-cluster-down")
        return code
    say("cluster running; press Ctrl-C to stop it")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print()
    cluster.stop()
    say("stopped")
    return code


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
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the jobs to finish")
    args = parser.parse_args(argv)
    return up(args) if args.command == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
