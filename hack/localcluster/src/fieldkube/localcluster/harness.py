"""A real local Kubernetes control plane for tests, benchmarks and `make cluster`.

It runs etcd, kube-apiserver (TLS, RBAC, service-account tokens), kube-controller-manager,
kube-scheduler, the kwok controller (fake GPU nodes; pods are simulated, no containers run) and the
Kubeflow mpi-operator as plain processes bound to 127.0.0.1, from the binaries that
hack/build-cluster-bins.sh caches. Everything a cluster writes lives in its state directory:
certificates, kubeconfigs, etcd data, logs (logs/<component>.log) and the process table
(processes.json), so `down` can stop a cluster that another process started.

Use it from Python (one cluster per pytest session)::

    cluster = LocalCluster(tmp_path / "cluster", nodes=4).start()
    cluster.kubectl("get", "nodes")
    sa_kubeconfig = cluster.service_account_kubeconfig("fieldkube-system", "fieldkube-operator")
    cluster.stop()

or from the command line (what `make cluster` / `make cluster-down` run)::

    fieldkube-localcluster up --state-dir DIR --nodes 4
    fieldkube-localcluster spawn --state-dir DIR --name operator -- python -m ...
    fieldkube-localcluster down --state-dir DIR

Pod simulation annotations (fieldkube.io/simulate-exit-code and friends) are documented in
kwok-stages.yaml beside this module and hack/cluster/README.md. Helpers live beside this file:
pki.py (certificates, kubeconfigs) and procs.py (processes, waiting, /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fieldkube.localcluster.node import NODE_PROCESSES, RealNode
from fieldkube.localcluster.pki import b64, kubeconfig_text, write_cluster_pki, write_file
from fieldkube.localcluster.procs import (
    ClusterError,
    Process,
    children_by_parent,
    free_port,
    kill_when_parent_dies,
    listening_inodes,
    socket_inodes,
    start_time_of,
    tail,
    wait_until,
)

__all__ = ["Binaries", "ClusterError", "LocalCluster", "Versions", "default_cache_dir", "default_state_dir"]

HERE = Path(__file__).resolve().parent
# The package is installed editable from hack/localcluster/ (it drives the Go builds of hack/cluster/).
REPO_ROOT = HERE.parents[4]
STAGES_FILE = HERE / "kwok-stages.yaml"
VERSIONS_FILE = REPO_ROOT / "hack" / "cluster" / "versions.env"

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
POD_CIDR = "10.128.0.0/12"
MPI_OPERATOR_USER = "fieldkube:mpi-operator"
CONTROL_PLANE = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "mpi-operator",
)

T = TypeVar("T")


def default_cache_dir() -> Path:
    """The cache that hack/build-cluster-bins.sh fills (``$FIELDKUBE_CACHE`` or ~/.cache/fieldkube)."""
    return Path(os.environ.get("FIELDKUBE_CACHE", Path.home() / ".cache" / "fieldkube")).expanduser()


def default_state_dir(name: str = "local") -> Path:
    """Where `make cluster` keeps a named cluster: outside the repository, beside the binaries."""
    return default_cache_dir() / "clusters" / name


# What the API server's audit log keeps: only writes to the objects the fieldkube operator owns (an MPIJob's
# creation, patch or deletion; a TrainingJob's status), at Metadata level (who, which user agent, when, the
# answer's code). Tests read it to check that of several operator replicas only the Lease's holder writes.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, patch, update, delete]
    resources:
      - group: kubeflow.org
        resources: [mpijobs]
      - group: fieldkube.io
        resources: [trainingjobs/status]
  - level: None
"""


@dataclass(frozen=True)
class Versions:
    """The pinned component versions (hack/cluster/versions.env)."""

    kubernetes: str
    etcd: str
    kwok: str
    mpi_operator: str
    coredns: str
    helm: str
    prometheus_operator: str

    @classmethod
    def load(cls, path: Path = VERSIONS_FILE) -> Versions:
        values: dict[str, str] = {}
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
        try:
            return cls(
                kubernetes=values["KUBERNETES_VERSION"],
                etcd=values["ETCD_VERSION"],
                kwok=values["KWOK_VERSION"],
                mpi_operator=values["MPI_OPERATOR_VERSION"],
                coredns=values["COREDNS_VERSION"],
                helm=values["HELM_VERSION"],
                prometheus_operator=values["PROMETHEUS_OPERATOR_VERSION"],
            )
        except KeyError as missing:
            raise ClusterError(f"{path} does not set {missing}") from None


@dataclass(frozen=True)
class Binaries:
    """Paths of the cached binaries for one set of versions."""

    bin_dir: Path
    versions: Versions

    def path(self, component: str) -> Path:
        version = {
            "etcd": self.versions.etcd,
            "kwok": self.versions.kwok,
            "mpi-operator": self.versions.mpi_operator,
            "coredns": self.versions.coredns,
            "helm": self.versions.helm,
        }.get(component, self.versions.kubernetes)
        return self.bin_dir / f"{component}-{version}" / component

    @property
    def mpijob_crd(self) -> Path:
        return self.path("mpi-operator").parent / "kubeflow.org_mpijobs.yaml"

    @property
    def mpi_operator_cluster_role(self) -> Path:
        return self.path("mpi-operator").parent / "cluster-role.yaml"

    @property
    def helm(self) -> Path:
        """The pinned helm (not needed to run a cluster: `make manifests` and the chart's tests use it)."""
        return self.path("helm")

    @property
    def prometheus_operator_crds(self) -> Path:
        """The directory of the pinned prometheus-operator's CRD files (ServiceMonitor, PodMonitor, ...)."""
        return self.bin_dir.parent / "crds" / f"prometheus-operator-{self.versions.prometheus_operator}"

    def check(self) -> None:
        wanted = [self.path(c) for c in (*CONTROL_PLANE, "kubectl")]
        wanted += [self.mpijob_crd, self.mpi_operator_cluster_role]
        missing = [str(p) for p in wanted if not p.exists()]
        if missing:
            raise ClusterError(
                "local control plane binaries are missing (build them with `make dev` or "
                "hack/build-cluster-bins.sh): " + ", ".join(missing)
            )


# --- the cluster --------------------------------------------------------------------------------


@dataclass
class LocalCluster:
    """One local control plane with ``nodes`` fake GPU nodes, driven from ``state_dir``.

    ``start()`` wipes any previous state in ``state_dir`` (after making sure no cluster of it still
    runs) and returns once the API server answers, every node is Ready and schedulable, the MPIJob
    CRD is established and the mpi-operator runs. YAML files under ``manifests/crd/`` and then
    ``manifests/rbac/`` of the repository are applied if those directories exist.

    With ``die_with_parent`` every process of the cluster is killed by the kernel when the process
    that started it exits without stopping it (a test session killed hard); `make cluster` leaves it
    off, since its processes must outlive the command that starts them.
    """

    state_dir: Path
    nodes: int = 4
    gpus_per_node: int = 8
    node_cpu: str = "96"
    node_memory: str = "768Gi"
    node_max_pods: int = 256
    node_name_prefix: str = "gpu-node-"
    bin_dir: Path | None = None
    manifests_dir: Path | None = REPO_ROOT / "manifests"
    start_timeout: float = 180.0
    verbose: bool = False
    die_with_parent: bool = False
    real_node: bool = False
    """Also run one real node (containerd, kubelet, kube-proxy, CoreDNS; see node.py): needs root."""
    versions: Versions = field(default_factory=Versions.load)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        self.binaries = Binaries(self.bin_dir or default_cache_dir() / "bin", self.versions)
        self._processes: dict[str, Process] = {}
        self.start_timings: dict[str, float] = {}
        """Seconds from ``start()`` until each step was ready (etcd, ..., ready), for benchmarks."""
        self._load_processes()

    # -- paths and identity ---------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user kubernetes-admin, group system:masters)."""
        return self.state_dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    @property
    def server(self) -> str:
        """The API server's URL, e.g. https://127.0.0.1:41234."""
        return str(self._info()["server"])

    @property
    def node_names(self) -> list[str]:
        return [f"{self.node_name_prefix}{i}" for i in range(self.nodes)]

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (JSON lines): who wrote the operator's objects, and when."""
        return self.logs_dir / "audit.log"

    def audit_events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The audit log's events (ResponseComplete stage), of one namespace when given, in log order."""
        if not self.audit_log.exists():
            return []
        events = [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]
        return [
            e for e in events if namespace is None or (e.get("objectRef") or {}).get("namespace") == namespace
        ]

    def _info(self) -> dict[str, Any]:
        path = self.state_dir / "cluster.json"
        if not path.exists():
            raise ClusterError(f"no cluster has been started in {self.state_dir}")
        info: dict[str, Any] = json.loads(path.read_text())
        return info

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def running(self) -> bool:
        """True if every control plane process of this state directory is alive (spawned extras aside)."""
        names = [*CONTROL_PLANE, *(NODE_PROCESSES if "kubelet" in self._processes else ())]
        core = [self._processes.get(name) for name in names]
        return all(p is not None and p.alive() for p in core)

    @property
    def node(self) -> RealNode:
        """The real node (started with ``real_node=True`` or by ``node.start``): node.py's NODE_NAME."""
        return RealNode(self)

    def start(self) -> LocalCluster:
        self.binaries.check()
        if self.nodes < 1:
            raise ClusterError(f"nodes must be >= 1 (got {self.nodes})")
        if self.gpus_per_node < 0:
            raise ClusterError(f"gpus_per_node must be >= 0 (got {self.gpus_per_node})")
        if any(p.alive() for p in self._processes.values()):
            raise ClusterError(
                f"a cluster is already running from {self.state_dir}; stop it first "
                f"(fieldkube-localcluster down --state-dir {self.state_dir})"
            )
        if self.real_node:
            self._clean_up_after_dead_node()
        t0 = time.monotonic()
        for attempt in (1, 2):
            self._reset_state_dir()
            try:
                self._start_all(t0)
                break
            except ClusterError:
                self.stop()
                # Ports are chosen free, then bound by the components: another process may take
                # one in between. That is worth one more try on fresh ports; anything else is not.
                if attempt == 1 and self._lost_a_port():
                    self._progress("a chosen port was taken before it was bound; starting again")
                    continue
                raise
            except BaseException:
                self.stop()
                raise
        self._progress(f"cluster ready in {time.monotonic() - t0:.1f}s; KUBECONFIG={self.kubeconfig}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process of this cluster (newest first); the state directory stays for post-mortems."""
        # The real node first, while the API server still runs: its pods are deleted through the
        # kubelet, then what it changed on the host is undone.
        for line in RealNode(self).stop(lambda name: self._terminate(self._processes[name], timeout)):
            self._progress(f"real node: {line}")
        for proc in reversed(list(self._processes.values())):
            self._terminate(proc, timeout)
        self._processes.clear()
        self._save_processes()

    def _clean_up_after_dead_node(self) -> None:
        """Undo what a real node left on this host when its cluster was killed (SIGKILL, a lost VM
        session) instead of stopped: its leftover processes, bridge, iptables rules and mounts would
        otherwise keep every later real node from starting until someone removes them by hand."""
        dead = RealNode(self).dead_owner()
        if dead is None:
            return
        self._progress(f"the real node of {dead} died without stopping; cleaning up after it")
        owner = self if dead == self.state_dir else LocalCluster(dead, bin_dir=self.binaries.bin_dir)
        owner.stop()

    def _lost_a_port(self) -> bool:
        for log in self.logs_dir.glob("*.log"):
            with contextlib.suppress(OSError):
                if "address already in use" in log.read_text(errors="replace"):
                    return True
        return False

    def _reset_state_dir(self) -> None:
        if self.state_dir.exists():
            marker = self.state_dir / "cluster.json"
            if (
                any(self.state_dir.iterdir())
                and not marker.exists()
                and not (self.state_dir / "pki").exists()
            ):
                raise ClusterError(f"{self.state_dir} is not empty and holds no cluster: refusing to wipe it")
            shutil.rmtree(self.state_dir)
        for sub in ("pki", "logs", "etcd", "kubeconfigs"):
            (self.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)

    def _start_all(self, t0: float) -> None:
        ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "cm", "scheduler", "mpi")}
        info = {
            "server": f"https://127.0.0.1:{ports['apiserver']}",
            "ports": ports,
            "nodes": self.node_names,
            "versions": self.versions.__dict__,
        }
        write_file(self.state_dir / "cluster.json", json.dumps(info, indent=2))
        self._write_pki()
        self._write_kubeconfigs()

        self._start_etcd(ports)
        self._mark("etcd", t0, f"etcd {self.versions.etcd}")
        self._start_apiserver(ports)
        self._mark("kube-apiserver", t0, f"kube-apiserver {self.versions.kubernetes}")
        # The controllers start side by side while the MPIJob API and the nodes are registered.
        self._start_controller_manager(ports)
        self._start_scheduler(ports)
        self._start_kwok()
        self._install_mpi_operator_api()
        self._create_nodes()
        insecure = ssl._create_unverified_context()  # their serving certificates are self-signed, in memory
        for name, port in (("kube-controller-manager", ports["cm"]), ("kube-scheduler", ports["scheduler"])):
            self.wait_http(name, f"https://127.0.0.1:{port}/healthz", insecure)
        self._mark("controllers", t0, "kube-controller-manager and kube-scheduler")
        self._wait_nodes_schedulable()
        self._mark("nodes", t0, f"{self.nodes} fake GPU nodes")
        self._start_mpi_operator(ports)
        self._mark("mpi-operator", t0, f"mpi-operator {self.versions.mpi_operator}")
        self._wait_default_service_account("default")
        if self.real_node:
            RealNode(self).start(t0)
        self.apply_project_manifests()
        self._mark("ready", t0, "the cluster")

    def _mark(self, step: str, t0: float, what: str) -> None:
        """Record (in ``start_timings``) and print how long the start took up to ``step``."""
        self.start_timings[step] = round(time.monotonic() - t0, 2)
        if step != "ready":
            self._progress(f"{what} ready ({self.start_timings[step]:.1f}s)")

    def _pki(self, name: str) -> Path:
        return self.state_dir / "pki" / name

    def _write_pki(self) -> None:
        write_cluster_pki(self.state_dir / "pki", SERVICE_CLUSTER_IP_RANGE, MPI_OPERATOR_USER)

    def _kubeconfig_text(self, user: str, credentials: Mapping[str, str]) -> str:
        return kubeconfig_text(self.server, self.ca_file.read_bytes(), user, credentials)

    def _client_kubeconfig(self, user: str) -> Path:
        return self.state_dir / "kubeconfigs" / f"{user}.kubeconfig"

    def _write_kubeconfigs(self) -> None:
        for user in ("admin", "controller-manager", "scheduler", "kwok", "mpi-operator"):
            text = self._kubeconfig_text(
                user,
                {
                    "client-certificate-data": b64(self._pki(f"{user}.crt").read_bytes()),
                    "client-key-data": b64(self._pki(f"{user}.key").read_bytes()),
                },
            )
            write_file(self._client_kubeconfig(user), text)
        shutil.copyfile(self._client_kubeconfig("admin"), self.kubeconfig)
        self.kubeconfig.chmod(0o600)

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.state_dir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=kill_when_parent_dies if self.die_with_parent else None,  # noqa: PLW1509
            )
        proc = Process(
            name=name, pid=popen.pid, argv=list(argv), log=str(log), start_time=start_time_of(popen.pid)
        )
        self._processes[name] = proc
        self._save_processes()
        return proc

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        kubeconfig: Path | None = None,
    ) -> int:
        """Start an extra process (e.g. the fieldkube operator) that the cluster stops with the rest.

        It gets ``KUBECONFIG`` (the admin kubeconfig unless ``kubeconfig`` is given) and logs to
        ``logs/<name>.log``. Returns its pid. The process is expected to bind loopback only.
        """
        if name in self._processes and self._processes[name].alive():
            raise ClusterError(f"a process named {name!r} already runs in this cluster")
        if not argv:
            raise ClusterError("spawn needs a command")
        resolved = str(Path(shutil.which(argv[0]) or argv[0]).absolute())
        merged = {"KUBECONFIG": str(kubeconfig or self.kubeconfig), **(env or {})}
        return self._spawn(name, [resolved, *argv[1:]], merged, cwd=Path.cwd()).pid

    def stop_process(self, name: str, timeout: float = 15.0) -> None:
        """Stop one process started with :meth:`spawn` before the cluster stops (a test's own server)."""
        proc = self._processes.pop(name, None)
        if proc is not None:
            self._terminate(proc, timeout)
            self._save_processes()

    def _terminate(self, proc: Process, timeout: float) -> None:
        if not proc.alive():
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            self._reap(proc.pid)
            time.sleep(0.1)
        if proc.alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        self._reap(proc.pid)

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def _save_processes(self) -> None:
        if self.state_dir.exists():
            data = {n: p.__dict__ for n, p in self._processes.items()}
            write_file(self.state_dir / "processes.json", json.dumps(data, indent=2))

    def _load_processes(self) -> None:
        path = self.state_dir / "processes.json"
        if path.exists():
            data = json.loads(path.read_text())
            self._processes = {n: Process(**p) for n, p in data.items()}

    def _check_alive(self, name: str) -> None:
        proc = self._processes[name]
        if not proc.alive():
            raise ClusterError(f"{name} exited during start-up\n{tail(Path(proc.log))}")

    def wait_http(
        self, name: str, url: str, context: ssl.SSLContext | None = None, timeout: float | None = None
    ) -> None:
        """Wait until ``url`` answers 200 while the cluster's process ``name`` lives (default: the
        cluster's start timeout); on timeout the error holds the tail of that process's log."""

        def probe() -> bool:
            self._check_alive(name)
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return bool(response.status == 200)

        wait_until(
            f"{name} at {url}",
            probe,
            self.start_timeout if timeout is None else timeout,
            on_fail=lambda: tail(self.log_path(name)),
        )

    # -- components -----------------------------------------------------------------------------

    def _start_etcd(self, ports: Mapping[str, int]) -> None:
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                str(self.binaries.path("etcd")),
                "--name=fieldkube",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=fieldkube={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=8589934592",
                "--auto-compaction-mode=periodic",
                "--auto-compaction-retention=5m",
                "--log-level=warn",
            ],
        )
        self.wait_http("etcd", f"{client}/health", None)

    def _start_apiserver(self, ports: Mapping[str, int]) -> None:
        pki = self.state_dir / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.path("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # Endpoints may not hold loopback addresses, and loopback is all this API server
                # serves: the `kubernetes` Service keeps no endpoints rather than an invalid one.
                "--endpoint-reconciler-type=none",
                f"--secure-port={ports['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                f"--cert-dir={pki}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-max-token-expiration=48h",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--max-requests-inflight=1600",
                "--max-mutating-requests-inflight=800",
                # A collection DELETE (namespace cleanup, `bench-operator`) removes its objects with this
                # many workers instead of one at a time: 1,000 TrainingJobs in 34-45 s instead of 122-137 s
                # on the 2-core VM (bench/README.md), and within the API server's 60 s request timeout.
                "--delete-collection-workers=8",
                "--profiling=false",
                f"--audit-policy-file={write_file(self.state_dir / 'audit-policy.yaml', AUDIT_POLICY)}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-maxsize=100",
                "--audit-log-maxbackup=1",
                "--v=1" if self.verbose else "--v=0",
            ],
        )
        context = ssl.create_default_context(cafile=str(self.ca_file))
        self.wait_http("kube-apiserver", f"{self.server}/readyz", context)

    def _component_args(self, user: str, port: int) -> list[str]:
        kubeconfig = self._client_kubeconfig(user)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--leader-elect=false",
        ]

    def _start_controller_manager(self, ports: Mapping[str, int]) -> None:
        pki = self.state_dir / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.path("kube-controller-manager")),
                *self._component_args("controller-manager", ports["cm"]),
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-job-syncs=10",
                "--v=1" if self.verbose else "--v=0",
            ],
        )

    def _start_scheduler(self, ports: Mapping[str, int]) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.path("kube-scheduler")),
                *self._component_args("scheduler", ports["scheduler"]),
                "--v=1" if self.verbose else "--v=0",
            ],
        )

    def _start_kwok(self) -> None:
        self._spawn(
            "kwok",
            [
                str(self.binaries.path("kwok")),
                f"--config={STAGES_FILE}",
                f"--kubeconfig={self._client_kubeconfig('kwok')}",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                "--node-lease-duration-seconds=40",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.1",
            ],
        )

    def _install_mpi_operator_api(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(self.binaries.mpijob_crd))
        self.kubectl("apply", "--server-side", "-f", str(self.binaries.mpi_operator_cluster_role))
        binding: dict[str, Any] = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "fieldkube-local-mpi-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "mpi-operator",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": MPI_OPERATOR_USER}
            ],
        }
        self.apply(binding)
        # The released ClusterRole lacks update on batch jobs/status, which the controller needs to resume
        # a suspended MPIJob (it rewrites the launcher Job's status): without it a resumed job never runs.
        job_status = "fieldkube-local-mpi-operator-job-status"
        self.apply(
            [
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": job_status},
                    "rules": [
                        {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["update", "patch"]}
                    ],
                },
                {
                    **binding,
                    "metadata": {"name": job_status},
                    "roleRef": {**binding["roleRef"], "name": job_status},
                },
            ]
        )

    def _node_manifest(self, name: str) -> dict[str, Any]:
        capacity = {
            "cpu": self.node_cpu,
            "memory": self.node_memory,
            "pods": str(self.node_max_pods),
            "ephemeral-storage": "1Ti",
            GPU_RESOURCE: str(self.gpus_per_node),
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.count": str(self.gpus_per_node),
                },
            },
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _create_nodes(self) -> None:
        # POST (not server-side apply, which drops the status of a Node) so capacity is set at once.
        nodes = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [self._node_manifest(n) for n in self.node_names],
        }
        self.kubectl("create", "-f", "-", input=yaml.safe_dump(nodes))

    def _wait_nodes_schedulable(self) -> None:
        def ready() -> bool:
            self._check_alive("kwok")
            nodes = self.get_json("nodes")["items"]
            good = 0
            for node in nodes:
                conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
                taints = node.get("spec", {}).get("taints") or []
                allocatable = node.get("status", {}).get("allocatable", {})
                if (
                    conditions.get("Ready") == "True"
                    and not taints
                    and allocatable.get(GPU_RESOURCE) == str(self.gpus_per_node)
                ):
                    good += 1
            return good == self.nodes

        wait_until(
            f"{self.nodes} Ready, untainted fake GPU nodes",
            ready,
            self.start_timeout,
            interval=0.5,
            on_fail=lambda: (
                tail(self.log_path("kwok")) + "\n" + self.kubectl("get", "nodes", "-o", "wide").stdout
            ),
        )

    def _start_mpi_operator(self, ports: Mapping[str, int]) -> None:
        self.wait_crds_established(["mpijobs.kubeflow.org"])
        self._spawn(
            "mpi-operator",
            [
                str(self.binaries.path("mpi-operator")),
                f"--kubeConfig={self._client_kubeconfig('mpi-operator')}",
                f"--health-address=127.0.0.1:{ports['mpi']}",
                "--threadiness=4",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--controller-queue-rate-limit=100",
                "--controller-queue-burst=500",
            ],
        )
        self.wait_http("mpi-operator", f"http://127.0.0.1:{ports['mpi']}/healthz", None)

    def _wait_default_service_account(self, namespace: str) -> None:
        wait_until(
            f"the default ServiceAccount of namespace {namespace}",
            lambda: (
                self.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0
            ),
            self.start_timeout,
        )

    def apply_project_manifests(self) -> list[Path]:
        """Apply the repository's YAML under manifests/crd/ then manifests/rbac/ (if they exist)."""
        applied: list[Path] = []
        if self.manifests_dir is None:
            return applied
        for sub in ("crd", "rbac"):
            directory = self.manifests_dir / sub
            found = [*directory.glob("*.yaml"), *directory.glob("*.yml")] if directory.is_dir() else []
            # The namespace first: namespaced objects (a Role, a ServiceAccount) need it to exist.
            files = sorted(found, key=lambda p: (p.stem != "namespace", p.name))
            for path in files:
                self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
                applied.append(path)
            if sub == "crd" and files:
                crds = [d for path in files for d in yaml.safe_load_all(path.read_text()) if d]
                self.wait_crds_established(d["metadata"]["name"] for d in crds)
        if applied:
            self._progress("applied " + ", ".join(str(p.relative_to(self.manifests_dir)) for p in applied))
        return applied

    # -- clients --------------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster (admin unless ``kubeconfig`` is given)."""
        argv = [str(self.binaries.path("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed with exit code {result.returncode}:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def get_json(self, *args: str, namespace: str | None = None) -> dict[str, Any]:
        """``kubectl get ARGS -o json`` parsed."""
        ns = ["-n", namespace] if namespace else []
        data: dict[str, Any] = json.loads(self.kubectl("get", *args, *ns, "-o", "json").stdout)
        return data

    def apply(self, manifest: Mapping[str, Any] | Iterable[Mapping[str, Any]] | str | Path) -> None:
        """Apply (server-side) a manifest given as a dict, a list of dicts, YAML text or a file path."""
        if isinstance(manifest, Path):
            text = manifest.read_text()
        elif isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, Mapping):
            text = yaml.safe_dump(dict(manifest))
        else:
            text = yaml.safe_dump_all([dict(m) for m in manifest])
        self.kubectl("apply", "--server-side", "--field-manager=fieldkube-harness", "-f", "-", input=text)

    def create_namespace(self, name: str) -> None:
        """Create a namespace and wait until pods can be created in it (its default ServiceAccount)."""
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self._wait_default_service_account(name)

    def service_account_kubeconfig(
        self,
        namespace: str,
        name: str,
        *,
        create: bool = True,
        duration: str = "24h",
        path: Path | None = None,
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` with a bound token.

        The token comes from the TokenRequest API (``kubectl create token``), so the holder has exactly
        the RBAC permissions granted to that ServiceAccount. With ``create`` the namespace and the
        ServiceAccount are created if missing.
        """
        if create:
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            self.apply(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": namespace},
                }
            )
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        if not token:
            raise ClusterError(f"the TokenRequest for ServiceAccount {namespace}/{name} returned no token")
        user = f"system:serviceaccount:{namespace}:{name}"
        target = path or self.state_dir / "kubeconfigs" / f"sa-{namespace}-{name}.kubeconfig"
        config = yaml.safe_load(self._kubeconfig_text(user, {"token": token}))
        config["contexts"][0]["context"]["namespace"] = namespace
        write_file(target, yaml.safe_dump(config, sort_keys=False))
        return target

    def wait_crds_established(self, names: Iterable[str], timeout: float = 60.0) -> None:
        """Until every named CRD is Established. Polled rather than `kubectl wait`, which fails at once
        ("status.conditions accessor error") on a CRD so new that it has no status yet."""
        wanted = list(names)

        def established() -> bool:
            items = self.get_json("crd", *wanted)
            found = items.get("items", [items]) if items.get("kind") == "List" else [items]
            return len(found) == len(wanted) and all(
                any(
                    c.get("type") == "Established" and c.get("status") == "True"
                    for c in (crd.get("status") or {}).get("conditions") or []
                )
                for crd in found
            )

        self.wait_for(f"CRDs {', '.join(wanted)} established", established, timeout=timeout, interval=0.2)

    def wait_for(
        self,
        what: str,
        probe: Callable[[], T | None],
        timeout: float = 60.0,
        interval: float = 0.25,
    ) -> T:
        """Poll ``probe`` until it returns a truthy value; on timeout raise with ``what`` and the logs."""
        return wait_until(what, probe, timeout, interval)

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        """Delete a namespace; its pods go at once (kwok plays the kubelet), freeing their GPUs."""
        self.kubectl("delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}")

    def process_table(self) -> dict[str, tuple[int, bool]]:
        """Each process of this cluster (control plane and spawned extras): its pid and whether it runs."""
        return {name: (proc.pid, proc.alive()) for name, proc in self._processes.items()}

    def diagnostics(self, lines: int = 25) -> str:
        """Which processes run, and the last ``lines`` of every log: what a failed test prints."""
        parts = [f"local cluster in {self.state_dir} (logs in {self.logs_dir})"]
        for name, (pid, alive) in self.process_table().items():
            parts.append(f"  {name:26} pid {pid:<8} {'running' if alive else 'NOT RUNNING'}")
        for name in self._processes:
            parts.append(tail(self.log_path(name), lines))
        return "\n".join(parts)

    def listening_sockets(self) -> dict[str, list[tuple[str, int]]]:
        """The TCP sockets each process of this cluster (or a child of one) listens on: (address, port).

        Read from /proc, so it also covers ports a component opens on its own (metrics, health).
        """
        listening = listening_inodes()
        children = children_by_parent()
        result: dict[str, list[tuple[str, int]]] = {}
        for name, proc in self._processes.items():
            if not proc.alive():
                continue
            found: set[tuple[str, int]] = set()
            todo = [proc.pid]
            while todo:
                pid = todo.pop()
                todo.extend(children.get(pid, ()))
                for inode in socket_inodes(pid):
                    if inode in listening:
                        found.add(listening[inode])
            result[name] = sorted(found)
        return result

    def _progress(self, message: str) -> None:
        print(f"[local-cluster] {message}", file=sys.stderr, flush=True)


# --- command line -------------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        args.state_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        verbose=args.verbose,
        real_node=args.real_node,
    )
    if cluster.running():
        print(f"[local-cluster] already running from {cluster.state_dir}; KUBECONFIG={cluster.kubeconfig}")
        return 0
    if cluster._processes:
        cluster.stop()
    cluster.start()
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    names = list(cluster._processes)
    if not names:
        print(f"[local-cluster] nothing runs from {cluster.state_dir}")
        return 0
    cluster.stop()
    print(
        f"[local-cluster] stopped {', '.join(names)} ({cluster.state_dir} kept; logs in {cluster.logs_dir})"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    if not cluster._processes:
        print(f"no cluster in {cluster.state_dir}")
        return 1
    for proc in cluster._processes.values():
        print(f"{proc.name:26} pid {proc.pid:<8} {'running' if proc.alive() else 'STOPPED'}  log {proc.log}")
    print(f"KUBECONFIG={cluster.kubeconfig}")
    return 0 if cluster.running() else 1


def _cmd_spawn(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    if not cluster.running():
        raise ClusterError(f"no running cluster in {cluster.state_dir}: run `make cluster` first")
    existing = cluster._processes.get(args.name)
    if existing and existing.alive():
        print(f"[local-cluster] {args.name} already runs (pid {existing.pid})")
        return 0
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    kubeconfig = None
    if args.service_account:
        namespace, _, name = args.service_account.partition("/")
        kubeconfig = cluster.service_account_kubeconfig(namespace, name, create=False)
    pid = cluster.spawn(args.name, command, kubeconfig=kubeconfig)
    print(f"[local-cluster] {args.name} started (pid {pid}, log {cluster.log_path(args.name)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command_name", required=True)
    state = {"type": Path, "default": default_state_dir(), "help": "cluster state directory"}
    up = sub.add_parser("up", help="start a cluster (no-op if it already runs)")
    up.add_argument("--state-dir", **state)  # type: ignore[arg-type]
    up.add_argument("--nodes", type=int, default=4, help="number of fake GPU nodes")
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--verbose", action="store_true", help="more component logging")
    up.add_argument(
        "--real-node", action="store_true", help="also run a real node (containerd, kubelet): root"
    )
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="stop a cluster")
    down.add_argument("--state-dir", **state)  # type: ignore[arg-type]
    down.set_defaults(func=_cmd_down)
    status = sub.add_parser("status", help="show the cluster's processes")
    status.add_argument("--state-dir", **state)  # type: ignore[arg-type]
    status.set_defaults(func=_cmd_status)
    spawn = sub.add_parser("spawn", help="start an extra process that `down` stops with the cluster")
    spawn.add_argument("--state-dir", **state)  # type: ignore[arg-type]
    spawn.add_argument("--name", required=True)
    spawn.add_argument("--service-account", help="NAMESPACE/NAME: run with that ServiceAccount's token")
    spawn.add_argument("command", nargs=argparse.REMAINDER)
    spawn.set_defaults(func=_cmd_spawn)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ClusterError as exc:
        print(f"local-cluster: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
