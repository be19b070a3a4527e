"""Fixtures shared by the integration tests: the real local Kubernetes control plane.

``local_cluster`` (session scope) starts one cluster per test session from the binaries that
``make dev`` caches (hack/build-cluster-bins.sh): etcd, kube-apiserver with TLS and RBAC,
kube-controller-manager, kube-scheduler, kwok with fake GPU nodes, and the Kubeflow mpi-operator.
The repository's manifests/crd/ and manifests/rbac/ are applied on start. ``cluster_namespace``
gives each test a fresh namespace in it. Set FIELDKUBE_TEST_NODES to change the node count (4) and
FIELDKUBE_KEEP_CLUSTER=1 to keep the state directory (logs, kubeconfig) after the session.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

HARNESS_PATH = Path(__file__).resolve().parents[2] / "hack" / "cluster" / "harness.py"


def load_cluster_harness() -> ModuleType:
    """Import hack/cluster/harness.py (not an installed package) as ``fieldkube_cluster_harness``."""
    name = "fieldkube_cluster_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HARNESS_PATH)
    assert spec is not None and spec.loader is not None, HARNESS_PATH
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cluster_harness = load_cluster_harness()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A running LocalCluster (hack/cluster/harness.py), shared by the whole session."""
    state_dir = tmp_path_factory.mktemp("local-cluster")
    cluster = cluster_harness.LocalCluster(state_dir, nodes=int(os.environ.get("FIELDKUBE_TEST_NODES", "4")))
    try:
        cluster.start()
    except cluster_harness.ClusterError as exc:
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("FIELDKUBE_KEEP_CLUSTER") != "1":
            shutil.rmtree(state_dir / "etcd", ignore_errors=True)


_namespace_numbers = itertools.count()


@pytest.fixture
def cluster_namespace(local_cluster: object, request: pytest.FixtureRequest) -> str:
    """A fresh namespace (named after the test) whose default ServiceAccount exists."""
    base = request.node.name.lower().replace("_", "-")
    base = "".join(c for c in base if c.isalnum() or c == "-").strip("-")[:50].rstrip("-")
    name = f"{base}-{next(_namespace_numbers)}"
    local_cluster.create_namespace(name)  # type: ignore[attr-defined]
    return name
