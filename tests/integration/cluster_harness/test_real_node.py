"""The local cluster's real node: containerd, a real kubelet, kube-proxy, the CNI bridge and CoreDNS.

Real containers from the project's images run here (no kwok): pods get addresses on the bridge, reach
each other directly, through a ClusterIP Service (kube-proxy's iptables rules) and by DNS name
(CoreDNS, cluster domain only), reach the API server with their ServiceAccount token through the
`kubernetes` Service (as an operator installed in the cluster does), `kubectl logs` reaches the kubelet,
and a memory limit is enforced.
Stopping the cluster must leave the host as it found it: iptables, sysctls, links, mounts, cgroups.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldkube.localcluster import node as real_node
from fieldkube.localcluster.harness import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]
IMAGE = "fieldkube/trainer:0.1.0"


def host_state() -> dict[str, Any]:
    """What the real node may change on this host, read the way a person would check it."""
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    shims = subprocess.run(
        ["pgrep", "-f", "containerd-shim"], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "iptables": real_node.iptables_rules("iptables"),
        "ip6tables": real_node.iptables_rules("ip6tables"),
        "sysctls": real_node.read_sysctls(),
        "links": sorted(real_node.link_names()),
        "mounts": sorted(mounts),
        "kubepods cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")),
        "containerd shims": len(shims),
    }


def pod(name: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {real_node.NODE_LABEL: real_node.NODE_LABEL_VALUE},
            "tolerations": [{"key": real_node.NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "main",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    **extra,
                }
            ],
        },
    }


def wait_phase(
    cluster: LocalCluster, ns: str, name: str, phases: set[str], timeout: float = 180
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        got = json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)
        return got if got.get("status", {}).get("phase") in phases else None

    try:
        return cluster.wait_for(f"pod {name} in {phases}", probe, timeout=timeout, interval=0.5)
    except Exception:
        print(cluster.kubectl("describe", "pod", name, "-n", ns, check=False).stdout)
        raise


def test_real_pods_network_dns_limits_and_a_clean_host_after_stop(tmp_path: Path) -> None:
    before = host_state()
    cluster = LocalCluster(tmp_path / "cluster", nodes=1, real_node=True, die_with_parent=True)
    try:
        cluster.start()
        node = json.loads(cluster.kubectl("get", "node", real_node.NODE_NAME, "-o", "json").stdout)
        assert node["metadata"]["labels"][real_node.NODE_LABEL] == real_node.NODE_LABEL_VALUE
        assert real_node.NODE_TAINT in [
            {k: t[k] for k in ("key", "value", "effect")} for t in node["spec"]["taints"]
        ]
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["InternalIP"] == real_node.NODE_IP
        # Nothing listens beyond loopback but on the bridge address the node created.
        sockets = cluster.listening_sockets()
        assert (real_node.NODE_IP, 10250) in sockets["kubelet"]
        assert (real_node.NODE_IP, 53) in sockets["coredns"]
        assert (real_node.NODE_IP, int(cluster.server.rsplit(":", 1)[1])) in sockets["api-forward"]
        allowed = {"127.0.0.1", "::1", real_node.NODE_IP}
        exposed = {name: [a for a in addrs if a[0] not in allowed] for name, addrs in sockets.items()}
        assert not any(exposed.values()), exposed

        ns = "realnode"
        cluster.create_namespace(ns)
        server = pod(
            "web",
            ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"],
            readinessProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 1},
        )
        cluster.apply([{**server, "metadata": {**server["metadata"], "namespace": ns}}])
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]},
            }
        )
        web = wait_phase(cluster, ns, "web", {"Running"})
        cluster.wait_for(
            "web Ready",
            lambda: (
                "True"
                in cluster.kubectl(
                    "get",
                    "pod",
                    "web",
                    "-n",
                    ns,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                ).stdout
            ),
            timeout=60,
        )
        web_ip = web["status"]["podIP"]
        assert web_ip.startswith("10.213.0."), web_ip
        service_ip = cluster.kubectl("get", "svc", "web", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
        # kube-proxy programs a Service some time after its endpoint is ready (as in any cluster; longer
        # under load): wait for its rules rather than racing them.
        cluster.wait_for(
            "kube-proxy rules for Service web",
            lambda: (
                f"-d {service_ip}/32" in (rules := real_node.iptables_rules("iptables"))
                and f"--to-destination {web_ip}:8000" in rules
            ),
            timeout=60,
        )

        # A second pod fetches the first by pod IP, by Service IP (kube-proxy) and by DNS name (CoreDNS);
        # a name outside the cluster must not resolve (no upstream forwarder).
        script = (
            "import socket, urllib.request as u\n"
            f"for url in ['http://{web_ip}:8000/', 'http://{service_ip}/', 'http://web.{ns}.svc.cluster.local/']:\n"
            "    print(url, u.urlopen(url, timeout=10).status, flush=True)\n"
            "try:\n"
            "    socket.gethostbyname('pypi.org'); print('outside resolved')\n"
            "except OSError:\n"
            "    print('outside not resolved')\n"
        )
        client = pod("client", ["python3", "-c", script])
        cluster.apply([{**client, "metadata": {**client["metadata"], "namespace": ns}}])
        done = wait_phase(cluster, ns, "client", {"Succeeded", "Failed"})
        logs = cluster.kubectl("logs", "client", "-n", ns).stdout  # API server -> kubelet
        assert done["status"]["phase"] == "Succeeded", logs
        assert f"http://{web_ip}:8000/ 200" in logs
        assert f"http://{service_ip}/ 200" in logs
        assert f"http://web.{ns}.svc.cluster.local/ 200" in logs
        assert "outside not resolved" in logs

        # A pod reaches the API server the in-cluster way: the `kubernetes` Service's environment, the
        # ServiceAccount's token and CA, TLS verified against the Service IP.
        whoami = (
            "import json, os, ssl, urllib.request as u\n"
            "d = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
            "url = 'https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews' % ("
            "os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])\n"
            "body = json.dumps({'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'})\n"
            "token = open(d + 'token').read()\n"
            "headers = {'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'}\n"
            "request = u.Request(url, data=body.encode(), headers=headers, method='POST')\n"
            "context = ssl.create_default_context(cafile=d + 'ca.crt')\n"
            "review = json.load(u.urlopen(request, context=context, timeout=10))\n"
            "print('whoami', review['status']['userInfo']['username'])\n"
        )
        in_cluster = pod("in-cluster", ["python3", "-c", whoami])
        in_cluster["spec"]["automountServiceAccountToken"] = True
        cluster.apply([{**in_cluster, "metadata": {**in_cluster["metadata"], "namespace": ns}}])
        done = wait_phase(cluster, ns, "in-cluster", {"Succeeded", "Failed"})
        logs = cluster.kubectl("logs", "in-cluster", "-n", ns).stdout
        assert done["status"]["phase"] == "Succeeded", logs
        assert f"whoami system:serviceaccount:{ns}:default" in logs, logs

        # A memory limit is enforced by the kernel: the container is OOMKilled (exit 137).
        hog = pod(
            "hog",
            ["python3", "-c", "x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096])"],
            resources={"limits": {"memory": "64Mi", "cpu": "500m"}},
        )
        cluster.apply([{**hog, "metadata": {**hog["metadata"], "namespace": ns}}])
        hogged = wait_phase(cluster, ns, "hog", {"Failed"})
        terminated = hogged["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137), yaml.safe_dump(
            terminated
        )
    finally:
        cluster.stop()
    assert_host_as_before(before, host_state())


def assert_host_as_before(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Nothing the node added may remain (what other programs on the host removed meanwhile is theirs)."""
    for key in ("iptables", "ip6tables", "links", "mounts", "kubepods cgroups"):
        added = set(after[key].splitlines() if isinstance(after[key], str) else after[key]) - set(
            before[key].splitlines() if isinstance(before[key], str) else before[key]
        )
        assert not added, f"{key} left behind by the real node: {sorted(added)}"
    assert after["sysctls"] == before["sysctls"]
    assert after["containerd shims"] <= before["containerd shims"]


@pytest.mark.parametrize("state_dir_left", [True, False], ids=["state-dir-left", "state-dir-gone"])
def test_a_killed_real_node_is_cleaned_up_by_the_next_cluster_that_starts_one(
    tmp_path: Path, state_dir_left: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    """A test run or `make cluster` killed with SIGKILL stops nothing: its processes die (or linger), but
    the bridge, iptables rules, mounts and a running container's shim stay on the host. The next
    real node must clean that up and start, not refuse until someone removes them by hand."""
    before = host_state()
    dead = LocalCluster(tmp_path / "dead", nodes=1, real_node=True)
    ns = "killed"
    try:
        dead.start()
        dead.create_namespace(ns)
        sleeper = pod("sleeper", ["sleep", "3600"])
        dead.apply([{**sleeper, "metadata": {**sleeper["metadata"], "namespace": ns}}])
        wait_phase(dead, ns, "sleeper", {"Running"})
    except BaseException:
        dead.stop()
        raise
    for proc in dead.process_table().values():  # what a SIGKILL of the whole run leaves: no stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc[0], signal.SIGKILL)
    time.sleep(1)
    assert real_node.BRIDGE in real_node.link_names()
    assert host_state()["containerd shims"] > before["containerd shims"], (
        "the pod's shim should outlive containerd"
    )
    if not state_dir_left:
        real_node.unmount_all([dead.state_dir])
        shutil.rmtree(dead.state_dir)

    survivor = LocalCluster(tmp_path / "next", nodes=1, real_node=True)
    try:
        survivor.start()
        survivor.create_namespace(ns)
        dead_pod = survivor.kubectl("get", "pod", "-n", ns, "--no-headers", check=False).stdout
        assert "sleeper" not in dead_pod, "the new cluster has its own API server: no pod of the dead one"
    finally:
        survivor.stop()
    assert (
        f"the real node of {dead.state_dir} died without stopping; cleaning up after it"
        in capfd.readouterr().err
    )
    assert_host_as_before(before, host_state())
