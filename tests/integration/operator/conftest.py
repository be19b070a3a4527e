"""Fixtures for the operator against the real local control plane: a real MLflow server, and the operator
as a subprocess (`fieldkube-operator run`) authenticated with its own ServiceAccount token, so the RBAC in
manifests/rbac/ is what it runs under. Pods are simulated by kwok (the one test double; see
hack/cluster/kwok-stages.yaml): everything else is the real API server, scheduler and mpi-operator.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{what} did not answer {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite + local artifacts) on loopback."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    log = root / "mlflow.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, "MLflow", log)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


class OperatorProcess:
    """`fieldkube-operator run` in a subprocess; kill() is SIGKILL (no graceful shutdown)."""

    def __init__(
        self, kubeconfig: Path, log: Path, mlflow_uri: str | None, extra_env: dict[str, str] | None = None
    ) -> None:
        self.kubeconfig, self.log, self.mlflow_uri = kubeconfig, log, mlflow_uri
        self.extra_env = extra_env or {}
        self.metrics_port, self.health_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FIELDKUBE_SYNC_INTERVAL_SECONDS": "2",
            **self.extra_env,
        }
        cmd = [
            str(BIN / "fieldkube-operator"),
            "run",
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            "--bind-address",
            "127.0.0.1",
            *args,
        ]
        if self.mlflow_uri:
            cmd += ["--mlflow-tracking-uri", self.mlflow_uri]
        with self.log.open("a") as out:
            out.write(f"\n===== start {' '.join(cmd)}\n")
            out.flush()
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_http(f"http://127.0.0.1:{self.health_port}/healthz", 60, "the operator", self.log)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


# The local cluster (hack/cluster/harness.py) also grants the mpi-operator update on batch jobs/status,
# which its released ClusterRole lacks and which resuming a suspended MPIJob needs.
@pytest.fixture(scope="session")
def operator_kubeconfig(local_cluster: Any) -> Path:
    """The operator's own ServiceAccount token (bound to manifests/rbac/clusterrole.yaml), not admin."""
    path: Path = local_cluster.service_account_kubeconfig(
        "fieldkube-system", "fieldkube-operator", create=False
    )
    return path


@pytest.fixture
def operator_factory(operator_kubeconfig: Path) -> Any:
    """Extra operator processes (same ServiceAccount, no MLflow) for restart and leader-election tests."""
    return lambda log, env=None, kubeconfig=None: OperatorProcess(
        kubeconfig or operator_kubeconfig, log, None, env
    )


@pytest.fixture(scope="session")
def kube_api(local_cluster: Any) -> client.ApiClient:
    """An admin API client for the tests' own reads and watches."""
    return config.new_client_from_config(str(local_cluster.kubeconfig))


class JobWatcher:
    """Waits on one TrainingJob through a watch, so every status the operator writes is seen in order."""

    def __init__(self, api: client.ApiClient, operator: OperatorProcess | None) -> None:
        self.api, self.operator = client.CustomObjectsApi(api), operator

    def wait(self, namespace: str, name: str, accept: Any, timeout: float) -> dict[str, Any]:
        """Block until accept(status) holds; returns the status, with the phases seen under '_seen'."""
        seen: list[str] = []
        status: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.api.list_namespaced_custom_object,
                    "fieldkube.io",
                    "v1alpha1",
                    namespace,
                    "trainingjobs",
                    field_selector=f"metadata.name={name}",
                    timeout_seconds=max(1, int(left)),
                ):
                    status = dict(event["object"].get("status") or {})
                    phase = status.get("phase")
                    if phase and (not seen or seen[-1] != phase):
                        seen.append(phase)
                    if accept(status):
                        stream.stop()
                        return {**status, "_seen": seen}
            except ApiException as exc:  # 410 Gone: the watch expired; watch again from now
                if exc.status != 410:
                    raise
        log = self.operator.log_text()[-3000:] if self.operator else ""
        pytest.fail(
            f"{namespace}/{name}: condition not met in {timeout}s; phases {seen}; status "
            f"{json.dumps(status, indent=1)}\noperator log tail:\n{log}"
        )


@pytest.fixture
def job_watcher(kube_api: client.ApiClient, operator: OperatorProcess) -> JobWatcher:
    return JobWatcher(kube_api, operator)


@pytest.fixture(scope="module")
def operator(
    operator_kubeconfig: Path, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator as a host process, for one test module. Not for the session: it watches every
    namespace, so while it ran it would also reconcile the TrainingJobs of later tests that install their
    own operator (tests/integration/platform), racing it with this one's defaults (a loopback MLflow)."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(operator_kubeconfig, log, mlflow_server, {}).start("--standalone")
    try:
        yield proc
    finally:
        proc.stop()
        print(f"operator log: {log}", file=sys.stderr)
