"""Operator overhead: N TrainingJobs through the operator vs the same N MPIJobs applied directly, one run.

Starts the local control plane (fieldkube.localcluster) and the operator with its own ServiceAccount,
then: (1) N MPIJobs built by the operator's own builder, created by --clients concurrent API clients, timed
until a watching client has seen all; (2) N equivalent TrainingJobs created the same way, timed until the
operator has created every MPIJob, with per-job latency (the TrainingJob's creation acknowledged to its
client → its MPIJob seen by the watching client) and the operator's peak
RSS; (3) once the operator has written their statuses (no sync for 5 s), the N jobs left alone for --idle
seconds: the operator's CPU share, syncs and RSS with them live;
(4) one delete of the TrainingJob collection, timed until they, their MPIJobs and their pods are gone,
beside the same delete of the MPIJob collection in (1). --repeat runs (1)-(4) again, the direct round
last in every second repeat; the summary's ratio is the median. --jobs-large adds a larger round through
the operator alone (--large-direct: with its baseline too), its jobs suspended unless --no-large-suspended.
Writes bench/results/operator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
import urllib3
from kubernetes import client, config, watch

from fieldkube.operator.mpijob_builder import build_mpijob
from fieldkube.operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def load_harness() -> Any:
    from fieldkube.localcluster import harness

    return harness


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Until the operator answers its liveness probe (it has logged in and started its handlers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the operator exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the operator did not answer /healthz in {timeout}s:\n{log.read_text()[-3000:]}")


def job_spec(suspended: bool = False) -> dict[str, Any]:
    """One GPU worker; the launcher runs for a day (kwok), so jobs that start keep running and the rest stay
    pending: with the jobs live and nothing changing, the idle window measures the operator alone.
    Suspended jobs get their MPIJobs, and the mpi-operator their Services, ConfigMaps, Secrets and suspended
    launcher Jobs, but no pods."""
    return {
        "runPolicy": {"suspend": suspended},
        "dataset": {"path": "prepared/x"},
        "workers": 1,
        "gpusPerWorker": 1,
        "pendingTimeoutSeconds": 0,
        "podMetadata": {"launcher": {"annotations": {"fieldkube.io/simulate-run-seconds": "86400"}}},
    }


def trainingjobs(n: int, suspended: bool = False) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "fieldkube.io/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": f"tj-{i:04d}"},
            "spec": job_spec(suspended),
        }
        for i in range(n)
    ]


def mpijobs(n: int, namespace: str, suspended: bool = False) -> list[dict[str, Any]]:
    spec = parse_spec(job_spec(suspended))
    return [build_mpijob(f"mj-{i:04d}", namespace, f"uid-{i}", spec) for i in range(n)]


class Watcher(threading.Thread):
    """Records when this client first sees each object of one kind in a namespace.

    Each watch resumes from the last resourceVersion seen: a watch started without one opens with every
    existing object again (1,000 MPIJobs every few seconds, for the API server to send and this client to
    parse, while the objects it is timing wait behind them). Events are parsed as plain JSON only.
    """

    def __init__(self, api: client.CustomObjectsApi, group: str, version: str, plural: str, namespace: str):
        super().__init__(daemon=True)
        self.args = (group, version, namespace, plural)
        self.api, self.stop_flag = api, False
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        version: str | None = None
        self.ready.set()
        while not self.stop_flag:
            resume = {"resource_version": version} if version else {}
            try:
                for event in watch.Watch().stream(
                    self.api.list_namespaced_custom_object,
                    *self.args,
                    timeout_seconds=5,
                    deserialize=False,
                    **resume,
                ):
                    meta = event["object"]["metadata"]
                    version = meta["resourceVersion"]
                    self.seen.setdefault(meta["name"], time.monotonic())
                    if self.stop_flag:
                        break
            except client.ApiException as error:
                if error.status != 410:  # 410: that version is gone; watch afresh (all objects again)
                    raise
                version = None


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop_flag = psutil.Process(pid), 0, False

    def run(self) -> None:
        while not self.stop_flag:
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.1)


class CpuMeter:
    """CPU seconds per process of the cluster (and the operator) over a window: where a round's time goes
    on a machine whose cores every component shares."""

    def __init__(self, cluster: Any, operator_pid: int) -> None:
        pids = {name: pid for name, (pid, _) in cluster.process_table().items()}
        pids["operator"] = operator_pid
        pids["bench"] = os.getpid()
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        seconds = {}
        for name, proc in self.procs.items():
            try:
                seconds[name] = sum(proc.cpu_times()[:2])
            except psutil.Error:
                seconds[name] = 0.0
        return seconds

    def seconds(self) -> dict[str, float]:
        """CPU seconds per process since this meter was made, the busiest first."""
        now = self._read()
        used = {name: round(now[name] - self.start[name], 1) for name in now}
        return dict(sorted(used.items(), key=lambda item: -item[1]))


def operator_processes(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def idle_usage(pid: int, seconds: float) -> tuple[float, float]:
    """(CPU share of one core, RSS in MiB) of the operator over ``seconds`` with nothing to do."""
    procs = operator_processes(pid)
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(seconds)
    after = sum(sum(p.cpu_times()[:2]) for p in procs)
    rss = sum(p.memory_info().rss for p in procs) / 2**20
    return (after - before) / seconds, rss


KINDS = {  # plural: (group, version); "" is the core group
    "trainingjobs": ("fieldkube.io", "v1alpha1"),
    "mpijobs": ("kubeflow.org", "v2beta1"),
    "pods": ("", "v1"),
}


def any_left(kind: str, namespace: str) -> bool:
    """Whether ``namespace`` still holds an object of ``kind``: a LIST of one item, not of all 10,000."""
    group, version = KINDS[kind]
    if not group:
        return bool(client.CoreV1Api().list_namespaced_pod(namespace, limit=1).items)
    page = client.CustomObjectsApi().list_namespaced_custom_object(group, version, namespace, kind, limit=1)
    return bool(cast(dict[str, Any], page)["items"])


def pod_count(namespace: str) -> int:
    """Pods in ``namespace``, from a LIST of one item and the count of the rest."""
    page = client.CoreV1Api().list_namespaced_pod(namespace, limit=1)
    rest = page.metadata.remaining_item_count if page.metadata else None
    return len(page.items) + (rest or 0)


def settle(read: Callable[[], float], quiet_s: float = 5.0, timeout: float = 600.0) -> float:
    """The monotonic time at which ``read()`` (polled each second) last changed, once it has stayed the
    same for ``quiet_s`` seconds (or the timeout)."""
    deadline = time.monotonic() + timeout
    last, last_change = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = read()
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
    return last_change


def wait_empty(kind: str, namespace: str, timeout: float) -> float:
    """The monotonic time at which no object of ``kind`` is left in ``namespace``."""
    load_harness().wait_until(
        f"every {kind} of {namespace} gone",
        lambda: not any_left(kind, namespace),
        timeout=timeout,
        interval=0.5,
    )
    return time.monotonic()


def delete_collection(kind: str, namespace: str, timeout: float) -> tuple[float, float]:
    """One DELETE of the collection (as `kubectl delete --all` would, without its one request per object):
    seconds until its objects are gone, and until their pods are (the garbage collector's cascade)."""
    group, version = KINDS[kind]
    t0 = time.monotonic()
    while True:
        # The API server gives a request 60 s; a collection it has not deleted by then stays half deleted
        # and the answer never comes. The DELETE is sent again until nothing of the kind is left.
        try:
            client.CustomObjectsApi().delete_collection_namespaced_custom_object(
                group, version, namespace, kind, _request_timeout=75
            )
            break
        except (client.ApiException, urllib3.exceptions.HTTPError) as error:
            reason = getattr(error, "status", None) or type(error).__name__
            print(
                f"collection DELETE of {kind} ended without an answer ({reason}); sending it again",
                flush=True,
            )
            if not any_left(kind, namespace) or time.monotonic() - t0 > timeout:
                break
    gone = wait_empty(kind, namespace, timeout) - t0
    return gone, wait_empty("pods", namespace, timeout) - t0


def operator_metric(metrics_port: int, sample: str) -> float:
    """One sample of the operator's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.rsplit(" ", 1)[0] == sample:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def syncs_done(metrics_port: int) -> float:
    return operator_metric(metrics_port, 'fieldkube_operator_reconcile_total{handler="sync"}')


def status_writes(metrics_port: int) -> float:
    return operator_metric(metrics_port, "fieldkube_operator_status_writes_total")


def submit(kind: str, namespace: str, docs: list[dict[str, Any]], clients: int) -> dict[str, float]:
    """Create ``docs`` from ``clients`` concurrent API clients (each a share of the objects, one POST per
    object, as many users or pipelines submitting at once would); the monotonic time at which each
    creation was acknowledged, by name: the start of that job's reconcile latency."""
    group, version = KINDS[kind]
    acknowledged: dict[str, float] = {}

    def create(share: list[dict[str, Any]]) -> None:
        api = client.CustomObjectsApi(client.ApiClient())  # a connection of its own
        for doc in share:
            api.create_namespaced_custom_object(group, version, namespace, kind, doc, _request_timeout=120)
            acknowledged[doc["metadata"]["name"]] = time.monotonic()

    shares = [docs[i::clients] for i in range(clients) if docs[i::clients]]
    with ThreadPoolExecutor(len(shares)) as pool:
        for future in [pool.submit(create, share) for share in shares]:
            future.result()
    return acknowledged


def wait_all(watcher: Watcher, names: list[str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(n in watcher.seen for n in names):
            return max(watcher.seen[n] for n in names)
        time.sleep(0.05)
    missing = [n for n in names if n not in watcher.seen]
    raise SystemExit(f"timed out: {len(missing)} of {len(names)} MPIJobs missing (e.g. {missing[:3]})")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Setup:
    """What every round shares: the cluster, a client, the operator's process and metrics, the load."""

    cluster: Any
    api: client.CustomObjectsApi
    operator_pid: int
    metrics_port: int
    clients: int
    idle_s: float


def run_one(
    setup: Setup,
    n: int,
    run_id: str,
    direct: bool = True,
    direct_first: bool = True,
    suspended: bool = False,
) -> dict[str, Any]:
    """One round through the operator and, with ``direct``, its baseline before or after it (repeated
    rounds alternate the order, so neither side always meets a cluster that has just done the other)."""
    direct_ns, operator_ns = f"direct-{run_id}", f"operator-{run_id}"
    long_s = max(1800.0, 2.0 * n)  # creating or deleting all of them: about 10 per second on 2 cores
    baseline: dict[str, Any] = {}
    if direct and direct_first:
        baseline = direct_round(setup, n, direct_ns, long_s, suspended)
    through = operator_round(setup, n, operator_ns, long_s, suspended)
    if direct and not direct_first:
        baseline = direct_round(setup, n, direct_ns, long_s, suspended)
    direct_s = baseline.get("direct_mpijobs_seconds", 0.0)
    direct_delete_s = baseline.get("direct_delete_mpijobs_seconds", 0.0)
    all_s, mpijobs_gone_s = through["seconds_until_all_mpijobs"], through["delete_until_mpijobs_gone_seconds"]
    if direct_s:
        print(f"[{n} jobs, {run_id}] all MPIJobs through the operator / directly: {all_s / direct_s:.2f}")
    return {
        "jobs": n,
        "suspended": suspended,
        "direct_first": direct_first,
        **through,
        **baseline,
        "overhead_ratio": round(all_s / direct_s, 2) if direct_s > 0 else None,
        "delete_ratio": round(mpijobs_gone_s / direct_delete_s, 2) if direct_delete_s > 0 else None,
    }


def operator_round(setup: Setup, n: int, operator_ns: str, long_s: float, suspended: bool) -> dict[str, Any]:
    """N TrainingJobs through the operator: until every MPIJob exists, their statuses, idle, deletion."""
    api, operator_pid, metrics_port, idle_s = setup.api, setup.operator_pid, setup.metrics_port, setup.idle_s
    setup.cluster.create_namespace(operator_ns)

    mj_watch = Watcher(api, "kubeflow.org", "v2beta1", "mpijobs", operator_ns)
    mj_watch.start()
    mj_watch.ready.wait()
    writes_before = status_writes(metrics_port)
    sampler = RssSampler(operator_pid)
    sampler.start()
    docs = trainingjobs(n, suspended)
    meter = CpuMeter(setup.cluster, operator_pid)
    t0 = time.monotonic()
    acknowledged = submit("trainingjobs", operator_ns, docs, setup.clients)
    tj_submit_s = max(acknowledged.values()) - t0
    names = [d["metadata"]["name"] for d in docs]
    all_s = wait_all(mj_watch, names, 2 * long_s) - t0
    cpu = meter.seconds()
    latencies = [mj_watch.seen[name] - acknowledged[name] for name in names]
    time.sleep(2)
    mj_watch.stop_flag = True
    print(f"[{n} jobs] all MPIJobs in {all_s:.1f}s; idle for {idle_s:.0f}s", flush=True)
    print(f"[{n} jobs] CPU seconds until then: {cpu}", flush=True)
    # After a burst the operator still writes the statuses of the jobs it created: work, not idling.
    settled_s = settle(lambda: syncs_done(metrics_port), timeout=long_s) - t0
    writes = status_writes(metrics_port) - writes_before
    print(f"[{n} jobs] statuses settled {settled_s:.1f}s after the create", flush=True)
    syncs_before = syncs_done(metrics_port)
    idle_cpu, idle_rss = idle_usage(operator_pid, idle_s)
    idle_syncs = syncs_done(metrics_port) - syncs_before
    sampler.stop_flag = True  # its peak spans the burst, the status writes and the idle jobs
    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        mpijobs_gone = pool.submit(wait_empty, "mpijobs", operator_ns, long_s)
        delete_s, pods_gone_s = delete_collection("trainingjobs", operator_ns, long_s)
        mpijobs_gone_s = mpijobs_gone.result() - t0
    print(
        f"[{n} jobs] deleted in {delete_s:.1f}s (MPIJobs gone after {mpijobs_gone_s:.1f}s, "
        f"pods {pods_gone_s:.1f}s)",
        flush=True,
    )
    return {
        "seconds_until_all_mpijobs": round(all_s, 3),
        "reconcile_p50_s": round(percentile(latencies, 0.5), 3),
        "reconcile_p95_s": round(percentile(latencies, 0.95), 3),
        "reconcile_mean_s": round(statistics.fmean(latencies), 3),
        "operator_peak_rss_mb": round(sampler.peak / 2**20, 1),
        "trainingjobs_submitted_seconds": round(tj_submit_s, 3),
        "statuses_settled_seconds": round(settled_s, 3),
        "status_writes_per_job": round(writes / n, 2),
        "cpu_seconds_until_all_mpijobs": cpu,
        "idle_seconds": idle_s,
        "idle_operator_cpu_percent_of_one_core": round(100 * idle_cpu, 2),
        "idle_operator_rss_mb": round(idle_rss, 1),
        "idle_operator_syncs": int(idle_syncs),
        "delete_all_trainingjobs_seconds": round(delete_s, 3),
        "delete_until_mpijobs_gone_seconds": round(mpijobs_gone_s, 3),
        "delete_until_pods_gone_seconds": round(pods_gone_s, 3),
    }


def direct_round(setup: Setup, n: int, namespace: str, long_s: float, suspended: bool) -> dict[str, Any]:
    """The baseline: the same N MPIJobs created by the same clients, then deleted as one collection
    (the garbage collector then removes their pods, Services, ConfigMaps and Secrets, as for TrainingJobs)."""
    setup.cluster.create_namespace(namespace)
    watcher = Watcher(setup.api, "kubeflow.org", "v2beta1", "mpijobs", namespace)
    watcher.start()
    watcher.ready.wait()
    docs = mpijobs(n, namespace, suspended)
    meter = CpuMeter(setup.cluster, setup.operator_pid)
    t0 = time.monotonic()
    submitted_s = max(submit("mpijobs", namespace, docs, setup.clients).values()) - t0
    created_s = wait_all(watcher, [d["metadata"]["name"] for d in docs], long_s) - t0
    cpu = meter.seconds()
    watcher.stop_flag = True
    # Deleted once the mpi-operator has made their pods, as the TrainingJobs are (after their statuses
    # settle): the same objects for the garbage collector to remove.
    settled_s = settle(lambda: pod_count(namespace), timeout=long_s) - t0
    delete_s, pods_gone_s = delete_collection("mpijobs", namespace, long_s)
    print(
        f"[{n} jobs] direct: created in {created_s:.1f}s, pods settled after {settled_s:.1f}s, "
        f"deleted in {delete_s:.1f}s (pods {pods_gone_s:.1f}s); CPU seconds until all created: {cpu}",
        flush=True,
    )
    return {
        "direct_mpijobs_seconds": round(created_s, 3),
        "direct_submitted_seconds": round(submitted_s, 3),
        "direct_pods_settled_seconds": round(settled_s, 3),
        "direct_delete_mpijobs_seconds": round(delete_s, 3),
        "direct_delete_until_pods_gone_seconds": round(pods_gone_s, 3),
        "direct_cpu_seconds_until_all_mpijobs": cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--jobs-large", type=int, default=0, help="a second, larger round (e.g. 1000)")
    parser.add_argument(
        "--large-direct",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time the direct-apply baseline in the larger round (it doubles a 10,000-job run)",
    )
    parser.add_argument(
        "--large-suspended",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="submit the larger round's jobs suspended: the operator creates and follows every MPIJob, the "
        "mpi-operator makes their Services, ConfigMaps, Secrets and launcher Jobs but no pods (a 2-core "
        "cluster creates about 2 pods per second: 10,000 jobs' pods alone would take over an hour)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of --jobs, each with its baseline, the order alternating (direct first, then last); "
        "the summary's ratio is their median",
    )
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument(
        "--clients", type=int, default=4, help="concurrent API clients submitting the jobs (one POST per job)"
    )
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the jobs sit idle (CPU, RSS)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/operator.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally block: stop the cluster

    harness = load_harness()
    state = Path(tempfile.mkdtemp(prefix="fieldkube-bench-operator-"))
    cluster = harness.LocalCluster(state, nodes=args.nodes)
    cluster.start()
    operator, succeeded = None, False
    try:
        sa = cluster.service_account_kubeconfig("fieldkube-system", "fieldkube-operator", create=False)
        log = (state / "operator.log").open("w")
        env = {**os.environ, "KUBECONFIG": str(sa)}
        health_port, metrics_port = free_port(), free_port()
        operator = subprocess.Popen(
            [
                str(BIN / "fieldkube-operator"),
                "run",
                "--standalone",
                "--metrics-port",
                str(metrics_port),
                "--health-port",
                str(health_port),
                "--bind-address",
                "127.0.0.1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_healthy(health_port, operator, state / "operator.log")
        config.load_kube_config(str(cluster.kubeconfig))
        api = client.CustomObjectsApi()
        setup = Setup(cluster, api, operator.pid, metrics_port, args.clients, args.idle)
        rounds = [run_one(setup, args.jobs, f"a{i}", direct_first=i % 2 == 0) for i in range(args.repeat)]
        ratios = [r["overhead_ratio"] for r in rounds]
        summary = {
            **rounds[0],
            "overhead_ratio": round(statistics.median(ratios), 2),
            "overhead_ratios": ratios,
        }
        if args.jobs_large:
            rounds.append(
                run_one(setup, args.jobs_large, "b", args.large_direct, suspended=args.large_suspended)
            )
        result = {
            **summary,
            "rounds": rounds,
            "command": " ".join(["bench/operator_bench.py", *sys.argv[1:]]),
            "nodes": args.nodes,
            "clients": args.clients,
            "cpus": os.cpu_count(),
            "machine": platform.node(),
            "python": platform.python_version(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        succeeded = True
    finally:
        if operator is not None:
            os.killpg(operator.pid, signal.SIGTERM)
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print("the operator did not stop within 30 s of SIGTERM; killed", file=sys.stderr)
                os.killpg(operator.pid, signal.SIGKILL)
                operator.wait()
                succeeded = False
        cluster.stop()
        if succeeded:  # 0.5 GB of etcd data and logs at 1,000 jobs; a failed run keeps them to read
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"logs of the failed run: {state}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
