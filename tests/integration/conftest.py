"""Fixtures shared by the integration tests: the real local Kubernetes control plane.

``local_cluster`` (session scope) starts one cluster per test session, on first use, from the
binaries that ``make dev`` caches (hack/build-cluster-bins.sh): etcd, kube-apiserver with TLS and
RBAC, kube-controller-manager, kube-scheduler, kwok with fake GPU nodes, and the Kubeflow
mpi-operator. The repository's manifests/crd/ and manifests/rbac/ are applied on start. It is
stopped when the session ends; its processes die with the session even if pytest is killed hard.

``cluster_namespace`` gives each test a fresh namespace and deletes it afterwards, so pods a test
leaves running do not hold the fake nodes' GPUs for later tests.

When a test that uses the cluster fails, its report gets a "local cluster" section: which
processes run and the tail of every component's log (all logs stay in the state directory, whose
path the session summary prints).

Environment: FIELDKUBE_TEST_NODES (fake GPU nodes, 4), FIELDKUBE_TEST_GPUS_PER_NODE (8),
FIELDKUBE_KEEP_CLUSTER=1 (keep etcd's data in the state directory after the session),
FIELDKUBE_KEEP_NAMESPACES=1 (do not delete test namespaces). The API is documented in
hack/cluster/README.md.

``real_node`` (session scope, on first use) adds the cluster's real node, which runs real containers
from the project's images; ``node_mlflow`` is an MLflow server its pods reach.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fieldkube.localcluster import harness as cluster_harness
from fieldkube.localcluster import monitors

_CLUSTER_KEY = pytest.StashKey[Any]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test`), the tests that need a real node run one after another in one worker:
    the node's bridge, routes and sysctls belong to the whole host, so only one real node can run at a time.
    The other ``cluster`` tests (fake nodes only) share a second worker's control plane, and the rest spread
    over the workers meanwhile. Without xdist the groups change nothing."""
    for item in items:
        if item.get_closest_marker("real_node") or "real_node" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("real-node"))
        elif item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.xdist_group("cluster"))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse to run real-node tests side by side: if pytest-xdist did not apply the groups above (it marks
    a grouped test's node id with ``@group``; a pytest it does not support drops that), stop before any test
    instead of failing at random later."""
    if not getattr(session.config.option, "loadgroup", False):  # set only in xdist workers
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]}): check the pytest and"
            " pytest-xdist versions pinned in constraints.txt, or run with TEST_WORKERS=0"
        )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a whole number (got {raw!r})") from None
    if value < 1:
        raise pytest.UsageError(f"{name} must be at least 1 (got {value})")
    return value


@pytest.fixture
def run_bench(tmp_path: Path) -> Callable[[str, list[str]], dict[str, Any]]:
    """Runs a script of bench/ as `make` would, with these flags and `--out` in the test's directory, and
    returns the JSON it wrote; a non-zero exit fails the test with the script's last output."""

    def run(script: str, args: list[str]) -> dict[str, Any]:
        out = tmp_path / f"{Path(script).stem}.json"
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run(
            [sys.executable, str(root / "bench" / script), *args, "--out", str(out)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    return run


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Any]:
    """A running LocalCluster (fieldkube.localcluster), shared by the whole session."""
    state_dir = tmp_path_factory.mktemp("local-cluster")
    cluster = cluster_harness.LocalCluster(
        state_dir,
        nodes=_env_int("FIELDKUBE_TEST_NODES", 4),
        gpus_per_node=_env_int("FIELDKUBE_TEST_GPUS_PER_NODE", 8),
        die_with_parent=True,
    )
    pytestconfig.stash[_CLUSTER_KEY] = cluster
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
def cluster_namespace(local_cluster: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (named after the test) whose default ServiceAccount exists; deleted after."""
    base = request.node.name.lower().replace("_", "-")
    base = "".join(c for c in base if c.isalnum() or c == "-").strip("-")[:50].rstrip("-")
    name = f"{base}-{next(_namespace_numbers)}"
    local_cluster.create_namespace(name)
    yield name
    if os.environ.get("FIELDKUBE_KEEP_NAMESPACES") != "1" and local_cluster.running():
        local_cluster.delete_namespace(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Attach the cluster's process table and log tails to the report of a failed cluster test."""
    outcome = yield
    report = outcome.get_result()
    cluster = item.config.stash.get(_CLUSTER_KEY, None)
    if report.failed and cluster is not None and "local_cluster" in getattr(item, "fixturenames", ()):
        report.sections.append(("local cluster", cluster.diagnostics()))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say where the cluster's logs are when anything failed."""
    cluster = config.stash.get(_CLUSTER_KEY, None)
    if cluster is not None and exitstatus != 0:
        terminalreporter.write_line(f"local cluster logs: {cluster.logs_dir}")


@pytest.fixture(scope="session")
def prometheus_operator_crds(local_cluster: Any) -> None:
    """ServiceMonitor, PodMonitor and PrometheusRule served by the session cluster (the CRDs only: no
    Prometheus operator runs here)."""
    monitors.install_crds(local_cluster)


@pytest.fixture(scope="session")
def real_node(local_cluster: Any) -> Any:
    """The session cluster's real node (containerd, kubelet, kube-proxy, CoreDNS), started on first use.

    It runs real containers from the project's images (`make images`); the session cluster stops it
    (and undoes its host changes) when the session ends.
    """
    node = local_cluster.node
    try:
        node.start(time.monotonic())
    except cluster_harness.ClusterError as exc:
        pytest.fail(f"the real node did not start: {exc}", pytrace=False)
    return node


@pytest.fixture(scope="session")
def node_mlflow(local_cluster: Any, real_node: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow server that pods on the real node reach (bound to the node's gateway address)."""
    from fieldkube.localcluster.services import start_mlflow

    return start_mlflow(local_cluster, tmp_path_factory.mktemp("node-mlflow"), name="node-mlflow")


@pytest.fixture(scope="session")
def field_dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a small prepared field dataset at prepared/field-small (the CPU example's path)."""
    from fieldkube.localcluster.services import prepare_cpu_example_dataset

    root = tmp_path_factory.mktemp("field-images")
    try:
        prepare_cpu_example_dataset(root)
    except cluster_harness.ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    return root
