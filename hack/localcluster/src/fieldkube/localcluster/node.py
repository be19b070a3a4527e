"""The local cluster's real node: containerd, kubelet, kube-proxy, a CNI bridge and CoreDNS.

Beside the kwok fake GPU nodes (whose pods are simulated), one node runs real containers from the
project's own images, so a CPU TrainingJob's launcher really runs ``mpirun`` over ssh into real worker
pods. Everything it needs runs as a plain process of the cluster (logs in ``logs/``), and everything it
changes on the host is recorded in ``node/node.json`` so that ``stop`` undoes it from any process:

- network: a bridge (``fkbr0``, gateway ``10.213.0.1/24``) that the CNI bridge plugin plugs pods into,
  no masquerade (pods reach this host and each other, nothing beyond); kubelet, CoreDNS and the
  kubelet's API listen on the gateway address, health and metrics endpoints on loopback; pods reach the
  loopback-only API server through the ``kubernetes`` Service, whose endpoint is a forwarder on the
  gateway address (``forward.py``; the API server's certificate names that address);
- iptables rules written by kube-proxy and the kubelet (chains ``KUBE-*``), removed on stop (the CNI
  config has no firewall or masquerade plugin, so it writes none; ``CNI-*`` chains of other tools stay);
- sysctls the bridge, kubelet and kube-proxy set (``net.ipv4.ip_forward``, ``vm.overcommit_memory``,
  ``kernel.panic``, ...), restored to the values read before start;
- pods' cgroups (``kubepods`` under each cgroup v1 controller), mounts under the node's directories and
  sandbox network namespaces, removed once the pods are gone.

Only one real node may run on a host at a time (it owns the bridge and the containerd root, which is
kept in the cache so that imported images survive clusters): a second cluster starts without one.

Facts this is built on (this machine: cgroup v1 hybrid, no CAP_SYS_RESOURCE): containerd's CRI plugin
needs ``restrict_oom_score_adj`` (negative oom_score_adj is denied), the kubelet needs
``failCgroupV1: false`` and ``cgroupDriver: cgroupfs``, and images are never pulled (there is no registry):
pods use ``imagePullPolicy: IfNotPresent`` or ``Never`` with images imported by :func:`import_images`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fieldkube.localcluster.pki import b64, write_file
from fieldkube.localcluster.procs import ClusterError, Process, free_port, start_time_of, tail, wait_until

if TYPE_CHECKING:
    from fieldkube.localcluster.harness import LocalCluster

NODE_NAME = "fieldkube-node"
BRIDGE = "fkbr0"
NODE_SUBNET = "10.213.0.0/24"
NODE_IP = "10.213.0.1"
CLUSTER_DOMAIN = "cluster.local"
# The label and taint that keep everything but jobs meant for real containers off this node: a CPU
# TrainingJob selects the label and tolerates the taint (manifests/examples/counter-cpu.yaml).
NODE_LABEL = "fieldkube.io/node"
NODE_LABEL_VALUE = "real"
NODE_TAINT = {"key": NODE_LABEL, "value": NODE_LABEL_VALUE, "effect": "NoSchedule"}
NODE_PROCESSES = ("containerd", "kubelet", "kube-proxy", "coredns", "api-forward")
CNI_BIN_DIR = Path("/usr/lib/cni")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip", "conntrack")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/var/run/netns")
CONTAINER_LOGS_DIR = Path("/var/log/containers")
# Sysctls that the bridge plugin, the kubelet (protectKernelDefaults off) and kube-proxy may write.
SYSCTLS = (
    "net.ipv4.ip_forward",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.conf.all.route_localnet",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
OWN_CHAIN = re.compile(r"\bKUBE-[A-Z0-9-]+")


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls(names: Iterable[str] = SYSCTLS) -> dict[str, str]:
    """The current value of each sysctl that exists here."""
    values = {}
    for name in names:
        with contextlib.suppress(OSError):
            values[name] = sysctl_path(name).read_text().strip()
    return values


def restore_sysctls(values: dict[str, str]) -> list[str]:
    """Write back ``values``; returns the names that changed (and were restored)."""
    restored = []
    for name, value in values.items():
        path = sysctl_path(name)
        with contextlib.suppress(OSError):
            if path.read_text().strip() != value:
                path.write_text(value)
                restored.append(name)
    return restored


def iptables_rules(binary: str = "iptables") -> str:
    """``iptables-save`` without counters and comments: what a test compares before and after."""
    if shutil.which(f"{binary}-save") is None:
        return ""
    out = subprocess.run([f"{binary}-save"], capture_output=True, text=True, check=False).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        lines.append(re.sub(r"\[\d+:\d+\]", "", line).rstrip())
    return "\n".join(lines)


def remove_own_iptables_rules(binary: str = "iptables") -> int:
    """Drop every chain named KUBE-* and every rule that mentions one; returns the lines dropped.

    The tables are saved, filtered and restored whole, so rules of anyone else stay as they are.
    """
    if shutil.which(f"{binary}-save") is None:
        return 0
    saved = subprocess.run([f"{binary}-save"], capture_output=True, text=True, check=False).stdout
    kept, dropped = [], 0
    for line in saved.splitlines():
        if not line.startswith("#") and OWN_CHAIN.search(line):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        subprocess.run(
            [f"{binary}-restore"], input="\n".join(kept) + "\n", text=True, check=True, capture_output=True
        )
    return dropped


def mounts_under(roots: Iterable[Path]) -> list[str]:
    """Mount points at or below any of ``roots``, deepest first (the order to unmount them)."""
    prefixes = [str(r.resolve()) for r in roots]
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def unmount_all(roots: Iterable[Path]) -> list[str]:
    points = mounts_under(roots)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points


def kill_cgroup_tasks(name: str = "kubepods", timeout: float = 10.0) -> int:
    """SIGKILL every process left in the ``name`` cgroup trees; returns how many there were.

    A container outlives its shim (it is re-parented, not killed), so after a node died without
    stopping its pods this is the one way to find and stop what still runs in them.
    """

    def tasks() -> set[int]:
        pids: set[int] = set()
        for top in [*CGROUP_ROOT.glob(f"*/{name}"), *CGROUP_ROOT.glob(name)]:
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(pid) for pid in procs.read_text().split())
        return pids

    found = tasks()
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while tasks() and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(found)


def remove_cgroups(name: str = "kubepods") -> list[Path]:
    """Remove the ``name`` tree under every cgroup v1 controller (and v2), deepest first.

    Only empty cgroups can be removed; a cgroup that still holds tasks is left and reported.
    """
    left: list[Path] = []
    for top in sorted(CGROUP_ROOT.glob(f"*/{name}")) + sorted(CGROUP_ROOT.glob(name)):
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, top]:
            try:
                d.rmdir()
            except OSError:
                left.append(d)
    return left


def link_names() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def links_on_bridge(bridge: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True, check=False
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


@dataclass
class NodeRecord:
    """What a running real node changed on the host: written at start, read by ``stop``."""

    owner: str
    sysctls: dict[str, str] = field(default_factory=dict)
    netns_before: list[str] = field(default_factory=list)
    container_logs_dir_existed: bool = True
    containerd_address: str = ""
    ports: dict[str, int] = field(default_factory=dict)


class RealNode:
    """The real node of one :class:`LocalCluster` (its processes are the cluster's processes)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.dir = cluster.state_dir / "node"
        self.cache = cluster.binaries.bin_dir.parent / "node"
        # Kept across clusters so that imported images (gigabytes) are imported once.
        self.containerd_root = self.cache / "containerd-root"
        self.owner_file = self.cache / "owner.json"
        # Sockets and the kubelet's root (which holds more sockets) need short paths (unix sockets are
        # limited to 107 bytes), so they live under the cache, named by a hash of the state directory.
        digest = hashlib.sha256(str(cluster.state_dir).encode()).hexdigest()[:8]
        self.run_dir = self.cache / f"run-{digest}"
        # What `make images` wrote (hack/build-images.sh): OCI archives and their index.
        self.images_dir = Path(os.environ.get("FIELDKUBE_IMAGES_DIR", self.cache.parent / "images"))

    # -- paths ----------------------------------------------------------------------------------

    @property
    def record_file(self) -> Path:
        return self.dir / "node.json"

    @property
    def containerd_socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.dir / "kubelet"

    def _record(self) -> NodeRecord | None:
        if not self.record_file.exists():
            return None
        return NodeRecord(**json.loads(self.record_file.read_text()))

    def _save(self, record: NodeRecord) -> None:
        write_file(self.record_file, json.dumps(asdict(record), indent=2))

    # -- preflight --------------------------------------------------------------------------------

    def check(self) -> None:
        """Fail with what is missing before touching anything on the host."""
        if os.geteuid() != 0:
            raise ClusterError("the real node needs root (containerd, the kubelet and iptables)")
        missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
        missing += [
            str(CNI_BIN_DIR / p)
            for p in ("bridge", "host-local", "loopback")
            if not (CNI_BIN_DIR / p).exists()
        ]
        missing += [
            str(self.cluster.binaries.path(c))
            for c in ("kubelet", "kube-proxy", "coredns")
            if not self.cluster.binaries.path(c).exists()
        ]
        if missing:
            raise ClusterError(
                "the real node needs these (Debian packages containerd runc containernetworking-plugins "
                "iptables conntrack, and the binaries make dev builds): " + ", ".join(missing)
            )
        owner = self._owner()
        if owner is not None and owner != str(self.cluster.state_dir):
            raise ClusterError(
                f"another local cluster ({owner}) runs the real node on this host; stop it first "
                f"(fieldkube-localcluster down --state-dir {owner}) or start this one without a real node"
            )
        if BRIDGE in link_names() and owner is None:
            raise ClusterError(
                f"network interface {BRIDGE} exists but no local cluster owns it: remove it "
                f"(ip link del {BRIDGE}) if it is a leftover"
            )
        subnet = ipaddress.ip_network(NODE_SUBNET)
        routes = subprocess.run(
            ["ip", "-o", "-4", "route"], capture_output=True, text=True, check=False
        ).stdout
        for line in routes.splitlines():
            dest = line.split()[0]
            if dest != "default" and BRIDGE not in line:
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_network(dest, strict=False).overlaps(subnet):
                        raise ClusterError(f"the real node's subnet {NODE_SUBNET} overlaps route {line!r}")

    def _owner_data(self) -> dict[str, Any] | None:
        if not self.owner_file.exists():
            return None
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.owner_file.read_text())
            if isinstance(data, dict) and "state_dir" in data:
                return data
        return None

    def _owner(self) -> str | None:
        """The state directory of the cluster whose real node runs now, if its containerd lives.

        Until its containerd starts, a node is owned by the process starting it (``starter``).
        """
        data = self._owner_data()
        if data is None:
            return None
        if data.get("containerd"):
            alive = Process(**data["containerd"]).alive()
        else:
            starter = data.get("starter") or {}
            alive = starter.get("pid") is not None and start_time_of(starter["pid"]) == starter.get(
                "start_time"
            )
        return str(data["state_dir"]) if alive else None

    def dead_owner(self) -> Path | None:
        """The state directory of a cluster whose real node died without stopping, if any.

        Its host changes (the bridge, iptables rules, mounts, sysctls) are still there: the next
        cluster with a real node cleans them up (``LocalCluster.start``) rather than refusing to start.
        """
        data = self._owner_data()
        if data is None or self._owner() is not None:
            return None
        return Path(data["state_dir"])

    # -- start ------------------------------------------------------------------------------------

    def start(self, t0: float) -> None:
        self.check()
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("kubelet", "cni/net.d", "cni/ipam", "pod-logs", "coredns"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # A run directory left by a cluster that died without stopping: nothing of it runs now.
        unmount_all([self.run_dir])
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        longest = self.run_dir / "kubelet" / "plugins_registry" / ("x" * 40)
        if len(str(longest)) > 107:
            raise ClusterError(
                f"{self.run_dir} is too long a path for the node's unix sockets: set FIELDKUBE_CACHE shorter"
            )
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        record = NodeRecord(
            owner=str(self.cluster.state_dir),
            sysctls=read_sysctls(),
            netns_before=sorted(p.name for p in NETNS_DIR.glob("*")) if NETNS_DIR.exists() else [],
            container_logs_dir_existed=CONTAINER_LOGS_DIR.exists(),
            containerd_address=str(self.containerd_socket),
            ports={
                name: free_port()
                for name in (
                    "kubelet-healthz",
                    "proxy-healthz",
                    "proxy-metrics",
                    "dns-health",
                    "dns-ready",
                    "containerd-stream",
                )
            },
        )
        self._save(record)
        # Owned before anything changes on the host, so that a crash from here on leaves a record
        # that the next cluster can clean up after (dead_owner).
        self._claim(record)
        self._make_bridge()
        self._write_cni_config()
        self._start_containerd(record)
        self._claim(record, self.cluster._processes["containerd"])
        self.cluster._mark("containerd", t0, "containerd")
        imported = import_images(self.containerd_socket, self.images_dir)
        self.cluster._mark("images", t0, f"images ({', '.join(imported) or 'none new'})")
        self._install_rbac()
        self._start_kubelet(record)
        self._start_kube_proxy(record)
        self._start_coredns(record)
        self._publish_api_server()
        self._wait_ready()
        self.cluster._mark("real-node", t0, f"real node {NODE_NAME}")

    def _claim(self, record: NodeRecord, containerd: Process | None = None) -> None:
        """Say in the cache (which outlives state directories) that this cluster's node owns the host.

        The owner lives while ``containerd`` does or, before it starts, while this process does; the
        record's copy lets a later cluster undo this node's host changes even if its state dir is gone.
        """
        owner: dict[str, Any] = {"state_dir": str(self.cluster.state_dir), "record": asdict(record)}
        if containerd is None:
            owner["starter"] = {"pid": os.getpid(), "start_time": start_time_of(os.getpid())}
        else:
            owner["containerd"] = asdict(containerd)
        write_file(self.owner_file, json.dumps(owner))

    def _make_bridge(self) -> None:
        # Created here (not by the CNI plugin on the first pod) because the kubelet, CoreDNS and the
        # pods' DNS need the gateway address before any pod exists.
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

        if BRIDGE not in link_names():
            ip("link", "add", BRIDGE, "type", "bridge")
        prefix = ipaddress.ip_network(NODE_SUBNET).prefixlen
        addrs = subprocess.run(
            ["ip", "-o", "-4", "addr", "show", BRIDGE], capture_output=True, text=True, check=False
        ).stdout
        if f"{NODE_IP}/{prefix}" not in addrs:
            ip("addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")

    def _write_cni_config(self) -> None:
        config = {
            "cniVersion": "1.0.0",
            "name": "fieldkube",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nothing leaves this host: no masquerade to the outside
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": NODE_SUBNET, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni" / "ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        write_file(self.dir / "cni" / "net.d" / "10-fieldkube.conflist", json.dumps(config, indent=2), 0o644)

    def _start_containerd(self, record: NodeRecord) -> None:
        state = self.run_dir / "containerd"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.run_dir / "containerd-ttrpc.sock"}"
[debug]
  address = ""
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "{record.ports["containerd-stream"]}"
  # This host denies a negative oom_score_adj (no CAP_SYS_RESOURCE): without this every sandbox fails
  # with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{self.run_dir / "runc"}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.dir / "cni" / "net.d"}"
    max_conf_num = 1
"""
        config_file = write_file(self.dir / "containerd.toml", config, 0o644)
        self.cluster._spawn("containerd", ["containerd", "--config", str(config_file)])

        def up() -> bool:
            self.cluster._check_alive("containerd")
            return self.ctr("version", check=False).returncode == 0

        wait_until("containerd", up, 60, on_fail=lambda: tail(self.cluster.log_path("containerd")))

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run_ctr(self.containerd_socket, *args, check=check, timeout=timeout)

    def _install_rbac(self) -> None:
        # CoreDNS reads Services, EndpointSlices, Namespaces and Pods (kubernetes plugin).
        self.cluster.apply(
            [
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": "fieldkube-local-coredns"},
                    "rules": [
                        {
                            "apiGroups": [""],
                            "resources": ["services", "namespaces", "pods", "endpoints"],
                            "verbs": ["list", "watch"],
                        },
                        {
                            "apiGroups": ["discovery.k8s.io"],
                            "resources": ["endpointslices"],
                            "verbs": ["list", "watch"],
                        },
                    ],
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": "fieldkube-local-coredns"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "fieldkube-local-coredns",
                    },
                    "subjects": [
                        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "fieldkube:coredns"}
                    ],
                },
            ]
        )

    def _client_kubeconfig(self, user: str) -> Path:
        pki = self.cluster.state_dir / "pki"
        text = self.cluster._kubeconfig_text(
            user,
            {
                "client-certificate-data": b64((pki / f"{user}.crt").read_bytes()),
                "client-key-data": b64((pki / f"{user}.key").read_bytes()),
            },
        )
        return write_file(self.cluster.state_dir / "kubeconfigs" / f"{user}.kubeconfig", text)

    def _start_kubelet(self, record: NodeRecord) -> None:
        pki = self.cluster.state_dir / "pki"
        resolv = write_file(self.dir / "kubelet" / "resolv.conf", "", 0o644)  # no host resolver for pods
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": record.ports["kubelet-healthz"],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            "podLogsDir": str(self.dir / "pod-logs"),
            "podCIDR": NODE_SUBNET,
            "maxPods": 32,
            "serializeImagePulls": False,
            # Locally built images cannot be pulled again: never garbage-collect them, and do not
            # evict pods for a full disk on a shared development machine.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "protectKernelDefaults": False,
            "registerWithTaints": [NODE_TAINT],
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "20s",
            "volumeStatsAggPeriod": "30s",
            "shutdownGracePeriod": "0s",
        }
        config_file = write_file(self.dir / "kubelet" / "config.yaml", yaml.safe_dump(config), 0o644)
        self.cluster._spawn(
            "kubelet",
            [
                str(self.cluster.binaries.path("kubelet")),
                f"--config={config_file}",
                f"--kubeconfig={self._client_kubeconfig('kubelet')}",
                f"--root-dir={self.run_dir / 'kubelet'}",
                f"--cert-dir={self.kubelet_dir / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={NODE_LABEL}={NODE_LABEL_VALUE},node.kubernetes.io/instance-type=local",
                "--v=1" if self.cluster.verbose else "--v=0",
            ],
        )

    def _start_kube_proxy(self, record: NodeRecord) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self._client_kubeconfig("kube-proxy"))},
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{record.ports['proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{record.ports['proxy-metrics']}",
            "clusterCIDR": NODE_SUBNET,
            "nodePortAddresses": [NODE_SUBNET],
            # Leave the host's conntrack limits alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        }
        config_file = write_file(self.dir / "kube-proxy.yaml", yaml.safe_dump(config), 0o644)
        self.cluster._spawn(
            "kube-proxy",
            [
                str(self.cluster.binaries.path("kube-proxy")),
                f"--config={config_file}",
                "--v=1" if self.cluster.verbose else "--v=0",
            ],
        )

    def _start_coredns(self, record: NodeRecord) -> None:
        kubeconfig = self._client_kubeconfig("coredns")
        corefile = f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{record.ports["dns-health"]}
    ready 127.0.0.1:{record.ports["dns-ready"]}
    cache 5
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 5
    }}
}}
"""
        path = write_file(self.dir / "coredns" / "Corefile", corefile, 0o644)
        self.cluster._spawn("coredns", [str(self.cluster.binaries.path("coredns")), "-conf", str(path)])

    def _publish_api_server(self) -> None:
        """Let pods reach the API server: a forwarder on the bridge address, and the `kubernetes` Service's
        endpoint pointing at it (the API server publishes none itself: it listens on loopback only)."""
        port = urllib.parse.urlsplit(self.cluster.server).port
        assert port is not None
        self.cluster._spawn(
            "api-forward",
            [
                sys.executable,
                "-m",
                "fieldkube.localcluster.forward",
                f"{NODE_IP}:{port}",
                f"127.0.0.1:{port}",
            ],
        )
        self.cluster.apply(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kubernetes",
                    "namespace": "default",
                    "labels": {
                        "kubernetes.io/service-name": "kubernetes",
                        "endpointslice.kubernetes.io/managed-by": "local-cluster.fieldkube.io",
                    },
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            }
        )

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((NODE_IP, port), timeout=1):
                return True
            return False

        wait_until(
            "API server forwarder", listening, 30, on_fail=lambda: tail(self.cluster.log_path("api-forward"))
        )

    def _wait_ready(self) -> None:
        def node_ready() -> bool:
            for name in NODE_PROCESSES:
                self.cluster._check_alive(name)
            node = self.cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if node.returncode != 0:
                return False
            conditions = {
                c["type"]: c["status"] for c in json.loads(node.stdout)["status"].get("conditions", [])
            }
            return conditions.get("Ready") == "True"

        wait_until(
            f"the real node {NODE_NAME} Ready",
            node_ready,
            self.cluster.start_timeout,
            interval=0.5,
            on_fail=lambda: "\n".join(tail(self.cluster.log_path(n)) for n in NODE_PROCESSES),
        )
        record = self._record()
        assert record is not None
        import urllib.request

        def dns_ready() -> bool:
            url = f"http://127.0.0.1:{record.ports['dns-ready']}/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        wait_until("CoreDNS ready", dns_ready, 60, on_fail=lambda: tail(self.cluster.log_path("coredns")))

    # -- stop -------------------------------------------------------------------------------------

    def stop(self, terminate: Any, timeout: float = 60.0) -> list[str]:
        """Stop the node's pods, then its processes, then undo what it changed on the host.

        ``terminate(name)`` stops one process of the cluster. Returns a line per thing cleaned up.
        Safe to call twice and after a crash (it works from ``node.json``, not from memory).
        """
        record = self._record()
        owner = self._owner_data()
        if record is None and owner is not None and owner["state_dir"] == str(self.cluster.state_dir):
            # Its state directory went (a temporary directory cleaned up) while the node's host
            # changes stayed: the owner file, kept in the cache, has a copy of the record.
            record = NodeRecord(**owner["record"]) if "record" in owner else None
        if record is None:
            return []
        done: list[str] = []
        procs = self.cluster._processes
        if all(procs.get(n) is not None and procs[n].alive() for n in ("kube-apiserver", "kubelet")):
            done += self._drain(timeout)
        for name in ("api-forward", "coredns", "kube-proxy", "kubelet"):
            if name in procs:
                terminate(name)
        if procs.get("containerd") is not None and procs["containerd"].alive():
            done += self._remove_containers()
        if "containerd" in procs:
            terminate("containerd")
        done += self._kill_shims(record)
        done += self._undo_host_changes(record)
        with contextlib.suppress(OSError):
            data = json.loads(self.owner_file.read_text())
            if data.get("state_dir") == str(self.cluster.state_dir):
                self.owner_file.unlink()
        self.record_file.unlink(missing_ok=True)
        return done

    def _drain(self, timeout: float) -> list[str]:
        """Delete every pod bound to the node and wait until the kubelet has stopped them."""
        pods = self.cluster.get_json(
            "pods", "--all-namespaces", f"--field-selector=spec.nodeName={NODE_NAME}"
        )
        names = [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods["items"]]
        for namespace, name in names:
            self.cluster.kubectl(
                "delete",
                "pod",
                name,
                "-n",
                namespace,
                "--grace-period=1",
                "--wait=false",
                "--ignore-not-found",
                check=False,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.cluster.get_json(
                "pods", "--all-namespaces", f"--field-selector=spec.nodeName={NODE_NAME}"
            )
            if not left["items"]:
                break
            time.sleep(0.5)
        return [f"deleted {len(names)} pod(s) on {NODE_NAME}"] if names else []

    def _remove_containers(self) -> list[str]:
        """Kill and delete whatever containers the CRI plugin still has (stopped sandboxes, mostly)."""
        tasks = self.ctr("-n", "k8s.io", "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            self.ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
        for task in tasks:
            self.ctr("-n", "k8s.io", "tasks", "delete", "-f", task, check=False, timeout=30)
        containers = self.ctr("-n", "k8s.io", "containers", "ls", "-q", check=False).stdout.split()
        if containers:
            self.ctr("-n", "k8s.io", "containers", "rm", *containers, check=False, timeout=60)
        return [f"removed {len(containers)} container(s) from containerd"] if containers else []

    def _kill_shims(self, record: NodeRecord) -> list[str]:
        """containerd's shims outlive containerd by design (they are re-parented to init): stop ours."""
        killed = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if (
                    argv
                    and argv[0].endswith(b"containerd-shim-runc-v2")
                    and record.containerd_address.encode() in b" ".join(argv)
                ):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(proc.name)
        return [f"killed {len(killed)} containerd shim(s)"] if killed else []

    def _undo_host_changes(self, record: NodeRecord) -> list[str]:
        done = []
        if killed := kill_cgroup_tasks():
            done.append(f"killed {killed} process(es) left in pod cgroups")
        proxy = self.cluster.binaries.path("kube-proxy")
        if proxy.exists():
            subprocess.run([str(proxy), "--cleanup"], capture_output=True, check=False, timeout=60)
        for binary in ("iptables", "ip6tables"):
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                if n := remove_own_iptables_rules(binary):
                    done.append(f"removed {n} {binary} lines (KUBE-*)")
        if shutil.which("nft"):
            for family in ("ip", "ip6"):
                subprocess.run(
                    ["nft", "delete", "table", family, "kube-proxy"], capture_output=True, check=False
                )
        for link in links_on_bridge(BRIDGE):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        if BRIDGE in link_names():
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
            done.append(f"removed bridge {BRIDGE}")
        if NETNS_DIR.exists():
            for ns in NETNS_DIR.glob("cni-*"):
                if ns.name not in record.netns_before:
                    subprocess.run(["umount", "-l", str(ns)], capture_output=True, check=False)
                    ns.unlink(missing_ok=True)
                    done.append(f"removed network namespace {ns.name}")
        if points := unmount_all([self.dir, self.run_dir, self.containerd_root]):
            done.append(f"unmounted {len(points)} mount(s)")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if left := remove_cgroups():
            done.append("cgroups still in use: " + ", ".join(map(str, left[:5])))
        if CONTAINER_LOGS_DIR.exists():
            pod_logs = str(self.dir / "pod-logs")
            for entry in CONTAINER_LOGS_DIR.iterdir():
                with contextlib.suppress(OSError):
                    if entry.is_symlink() and str(entry.readlink()).startswith(pod_logs):
                        entry.unlink()
            if not record.container_logs_dir_existed:
                with contextlib.suppress(OSError):
                    CONTAINER_LOGS_DIR.rmdir()
        if restored := restore_sysctls(record.sysctls):
            done.append("restored sysctls " + ", ".join(restored))
        return done


PAUSE_IMAGE = "localhost/fieldkube/pause:1.0"


def run_ctr(
    socket: Path, *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ctr", "--address", str(socket), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise ClusterError(f"ctr {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def import_images(socket: Path, images_dir: Path) -> list[str]:
    """Import the images that ``make images`` saved (``images_dir/index.json``) unless present.

    Returns the references imported. An image whose digest containerd already has is skipped, so a
    warm start costs one ``ctr images ls``.
    """
    index_file = images_dir / "index.json"
    if not index_file.exists():
        raise ClusterError(f"no images to run on the real node: {index_file} is missing (run make images)")
    index: list[dict[str, Any]] = json.loads(index_file.read_text())
    have = run_ctr(socket, "-n", "k8s.io", "images", "ls").stdout
    imported = []
    for image in index:
        if image["reference"] in have and image.get("digest", "") in have:
            continue
        command = ("-n", "k8s.io", "images", "import", "--all-platforms", str(image["archive"]))
        for attempt in (1, 2, 3):
            result = run_ctr(socket, *command, check=False, timeout=1800)
            if result.returncode == 0:
                break
            error = result.stderr.strip() or result.stdout.strip()
            # Re-tagging an image makes the old one's snapshots garbage; containerd may collect a layer
            # the new image shares (the base) between the import's content and unpack steps. Its content
            # is kept, so importing again unpacks the missing snapshot anew.
            if "snapshot" not in error or attempt == 3:
                raise ClusterError(f"ctr {' '.join(command)} failed: {error}")
        imported.append(str(image["reference"]))
    return imported
