"""The operator against the real local control plane: kube-apiserver (TLS, RBAC), scheduler,
controller-manager and the real mpi-operator; kwok simulates the pods (hack/cluster/kwok-stages.yaml).
The operator runs as a subprocess with its own ServiceAccount token, so a missing RBAC rule fails here.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "manifests/examples"
SIM = "fieldkube.io/simulate-"
# How the API server words a request that RBAC denied to the operator's ServiceAccount (JSON-escaped in logs).
RBAC_DENIAL = re.compile(
    r'forbidden: User \\?"system:serviceaccount:fieldkube-system:fieldkube-operator\\?" cannot'
)
pytestmark = pytest.mark.cluster


def apply(cluster: Any, namespace: str, doc: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


def trainingjob(name: str, **spec: Any) -> dict[str, Any]:
    body = {"dataset": {"path": "prepared/x"}, "workers": 1, "gpusPerWorker": 1, **spec}
    return {
        "apiVersion": "fieldkube.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


def get(cluster: Any, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def bound_pvc(cluster: Any, namespace: str, name: str) -> None:
    """A PersistentVolume (hostPath) and a claim bound to it by the real PV controller."""
    pv = f"{namespace}-{name}"[:63]
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/{pv}"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        }
    )
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )
    cluster.wait_for(
        f"PVC {name} bound",
        lambda: (get(cluster, namespace, "pvc", name) or {}).get("status", {}).get("phase") == "Bound",
        timeout=60,
    )


# Examples for the real node (CPU jobs that select it) train for real in test_demo_cluster.py and, through
# the installed chart, in tests/integration/platform/test_helm_install.py.
SIMULATED_EXAMPLES = sorted(
    p.name
    for p in EXAMPLES.glob("*.yaml")
    if "fieldkube.io/node"
    not in yaml.safe_load(p.read_text())["spec"].get("scheduling", {}).get("nodeSelector", {})
)


@pytest.mark.parametrize("example", SIMULATED_EXAMPLES)
def test_example_goes_pending_running_succeeded(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any, example: str
) -> None:
    doc = yaml.safe_load((EXAMPLES / example).read_text())
    name, spec = doc["metadata"]["name"], doc["spec"]
    for volume in (spec.get("dataset", {}).get("pvc"), spec.get("checkpoint", {}).get("pvc")):
        if volume:
            bound_pvc(local_cluster, cluster_namespace, volume)
    if spec.get("scheduling", {}).get("nodeSelector"):
        for node in local_cluster.node_names:
            labels = [f"{k}={v}" for k, v in spec["scheduling"]["nodeSelector"].items()]
            local_cluster.kubectl("label", "node", node, *labels, "--overwrite")
    # kwok: the launcher "runs" 3 s so that Running is observable, then exits 0
    spec["podMetadata"] = {"launcher": {"annotations": {f"{SIM}run-seconds": "3"}}}
    apply(local_cluster, cluster_namespace, doc)

    status = job_watcher.wait(cluster_namespace, name, lambda s: s.get("phase") == "Succeeded", 120)
    assert status["_seen"] == ["Pending", "Running", "Succeeded"], status["_seen"]
    workers, gpus = spec["workers"], spec["workers"] * spec["gpusPerWorker"]
    assert status["mpiJobName"] == name and status["gpus"] == gpus
    assert status["workers"]["total"] == workers and status["startTime"] and status["completionTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"

    mpijob = get(local_cluster, cluster_namespace, "mpijob", name)
    assert mpijob is not None
    owner = mpijob["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingJob" and owner["name"] == name and owner["controller"] is True
    # the real mpi-operator made the pods, the scheduler bound them to fake GPU nodes
    pods = local_cluster.get_json(
        "pods", "-l", f"training.kubeflow.org/job-name={name}", namespace=cluster_namespace
    )
    launchers = [
        p for p in pods["items"] if p["metadata"]["labels"]["training.kubeflow.org/job-role"] == "launcher"
    ]
    assert len(launchers) == 1 and launchers[0]["spec"]["nodeName"].startswith("gpu-node-")
    assert "nvidia.com/gpu" not in json.dumps(launchers[0]["spec"]["containers"][0]["resources"])
    assert launchers[0]["spec"]["containers"][0]["command"][0] == "mpirun"
    # cleanPodPolicy (Running / All) removes the still-running workers once the job succeeded
    local_cluster.wait_for(
        "workers cleaned up",
        lambda: (
            not [
                p
                for p in local_cluster.get_json(
                    "pods",
                    "-l",
                    f"training.kubeflow.org/job-name={name},training.kubeflow.org/job-role=worker",
                    namespace=cluster_namespace,
                )["items"]
                if p["status"].get("phase") == "Running"
            ]
        ),
        timeout=60,
    )


def test_failing_worker_ends_failed_with_the_diagnosis(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    doc = trainingjob(
        "oom",
        workers=2,
        podMetadata={
            "worker": {
                "annotations": {
                    f"{SIM}exit-code": "137",
                    f"{SIM}reason": "OOMKilled",
                    f"{SIM}run-seconds": "3",
                }
            },
            # mpirun exits non-zero once a rank dies: the launcher fails after its workers
            "launcher": {"annotations": {f"{SIM}exit-code": "1", f"{SIM}run-seconds": "5"}},
        },
    )
    apply(local_cluster, cluster_namespace, doc)
    status = job_watcher.wait(cluster_namespace, "oom", lambda s: s.get("phase") == "Failed", 120)
    diagnosis = status["diagnosis"]
    assert diagnosis["pod"].startswith("oom-worker-") and diagnosis["role"] == "worker"
    assert diagnosis["exitCode"] == 137 and diagnosis["reason"] == "OOMKilled"
    assert status["reason"] == "OOMKilled" and status["completionTime"]
    assert status["_seen"][-1] == "Failed" and "Succeeded" not in status["_seen"]
    # kwok runs no kubelet, so no log can be read: the diagnosis says so by an empty tail, not an error
    assert diagnosis.get("logTail", []) == []


def test_too_many_gpus_shows_unschedulable_then_fails_at_the_pending_timeout(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    apply(local_cluster, cluster_namespace, trainingjob("greedy", gpusPerWorker=16, pendingTimeoutSeconds=20))
    created = time.monotonic()
    pending = job_watcher.wait(cluster_namespace, "greedy", lambda s: s.get("reason") == "Unschedulable", 30)
    shown_after = time.monotonic() - created
    assert pending["phase"] == "Pending" and "Insufficient nvidia.com/gpu" in pending["message"], pending
    assert shown_after < 15, f"the Unschedulable reason took {shown_after:.1f}s"
    failed = job_watcher.wait(cluster_namespace, "greedy", lambda s: s.get("phase") == "Failed", 60)
    assert failed["reason"] == "Unschedulable" and "pendingTimeoutSeconds" in failed["message"]
    assert any(c["type"] == "Failed" and c["reason"] == "PendingTimeout" for c in failed["conditions"])
    # the pending pods are removed (the MPIJob is suspended) so they cannot start later
    assert (get(local_cluster, cluster_namespace, "mpijob", "greedy") or {})["spec"]["runPolicy"][
        "suspend"
    ] is True
    local_cluster.wait_for(
        "pending pods removed",
        lambda: (
            not local_cluster.get_json(
                "pods", "-l", "fieldkube.io/training-job=greedy", namespace=cluster_namespace
            )["items"]
        ),
        timeout=60,
    )


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"workers": 0}, "spec.workers"),
        ({"gpusPerWorker": 17}, "spec.gpusPerWorker"),
        ({"model": {"name": "resnet-9000"}}, "spec.model.name"),
        ({"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "spec.runPolicy.cleanPodPolicy"),
        ({"training": {"train": {"lr": -1}}}, "spec.training.train.lr"),
        ({"training": {"runtime": {"backend": "single"}}, "workers": 2}, "spec.training.runtime.backend"),
        ({"dataset": None}, "spec.dataset"),
    ],
)
def test_invalid_specs_are_rejected_with_field_level_messages(
    local_cluster: Any, cluster_namespace: str, patch: dict[str, Any], expected: str
) -> None:
    doc = trainingjob("bad")
    doc["spec"].update(patch)
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    result = apply(local_cluster, cluster_namespace, doc, check=False)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert get(local_cluster, cluster_namespace, "trainingjob", "bad") is None


def test_name_length_and_model_immutability_are_enforced(local_cluster: Any, cluster_namespace: str) -> None:
    result = apply(local_cluster, cluster_namespace, trainingjob("x" * 51), check=False)
    assert result.returncode != 0 and "metadata.name must be at most 50" in result.stderr, result.stderr
    doc = trainingjob("fixed", pendingTimeoutSeconds=0, runPolicy={"suspend": True})
    apply(local_cluster, cluster_namespace, doc)
    doc["spec"]["model"] = {"name": "counter-fcrn"}
    result = apply(local_cluster, cluster_namespace, doc, check=False)
    assert result.returncode != 0 and "spec.model is immutable" in result.stderr, result.stderr


def test_progress_from_mlflow_and_deletion_kills_the_run(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any, mlflow_server: str
) -> None:
    """kwok runs no trainer, so the test plays its MLflow part: a run tagged with the job's uid."""
    doc = trainingjob(
        "tracked",
        podMetadata={"launcher": {"annotations": {f"{SIM}run-seconds": "600"}}},
        mlflow={"experiment": cluster_namespace},
        training={"train": {"epochs": 4}},
    )
    apply(local_cluster, cluster_namespace, doc)
    job_watcher.wait(cluster_namespace, "tracked", lambda s: s.get("phase") == "Running", 60)
    uid = get(local_cluster, cluster_namespace, "trainingjob", "tracked")["metadata"]["uid"]
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = httpx.post(f"{api}/experiments/create", json={"name": cluster_namespace}).json()[
        "experiment_id"
    ]
    run = httpx.post(
        f"{api}/runs/create",
        json={"experiment_id": experiment, "tags": [{"key": "fieldkube.job.uid", "value": uid}]},
    ).json()["run"]["info"]["run_id"]
    now = int(time.time() * 1000)
    metrics = {
        "progress_epoch": 2,
        "progress_step": 50,
        "progress_percent": 50.0,
        "train_loss": 0.125,
        "images_per_second": 321.0,
    }
    httpx.post(
        f"{api}/runs/log-batch",
        json={
            "run_id": run,
            "metrics": [{"key": k, "value": v, "timestamp": now, "step": 50} for k, v in metrics.items()],
        },
    ).raise_for_status()
    status = job_watcher.wait(
        cluster_namespace, "tracked", lambda s: (s.get("progress") or {}).get("percent") == 50.0, 30
    )
    assert status["progress"]["summary"] == "epoch 2/4 50%" and status["progress"]["loss"] == 0.125
    assert status["mlflow"]["runId"] == run and status["mlflow"]["runUrl"].endswith(f"/runs/{run}")
    printed = local_cluster.kubectl("get", "tj", "tracked", "-n", cluster_namespace).stdout
    assert "epoch 2/4 50%" in printed and "counter-mcnn" in printed and "Running" in printed, printed

    local_cluster.kubectl(
        "delete", "trainingjob", "tracked", "-n", cluster_namespace, "--wait=true", timeout=60
    )
    local_cluster.wait_for(
        "MPIJob garbage-collected",
        lambda: get(local_cluster, cluster_namespace, "mpijob", "tracked") is None,
        timeout=30,
    )

    def run_status() -> str:
        return str(httpx.get(f"{api}/runs/get", params={"run_id": run}).json()["run"]["info"]["status"])

    # the operator learns of the deletion from its watch, after kubectl has returned: it ends the run soon,
    # not before the object is gone (it holds no finalizer, so a stopped operator cannot block deletion)
    local_cluster.wait_for("MLflow run marked KILLED", lambda: run_status() == "KILLED", timeout=30)


def test_ttl_after_finished_deletes_the_job(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    apply(local_cluster, cluster_namespace, trainingjob("brief", runPolicy={"ttlSecondsAfterFinished": 2}))
    job_watcher.wait(cluster_namespace, "brief", lambda s: s.get("phase") == "Succeeded", 60)
    local_cluster.wait_for(
        "TrainingJob deleted after its TTL",
        lambda: get(local_cluster, cluster_namespace, "trainingjob", "brief") is None,
        timeout=30,
    )
    local_cluster.wait_for(
        "MPIJob garbage-collected",
        lambda: get(local_cluster, cluster_namespace, "mpijob", "brief") is None,
        timeout=30,
    )


def test_suspend_and_resume_map_to_the_mpijob(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    doc = trainingjob("pausable", podMetadata={"launcher": {"annotations": {f"{SIM}run-seconds": "600"}}})
    apply(local_cluster, cluster_namespace, doc)
    job_watcher.wait(cluster_namespace, "pausable", lambda s: s.get("phase") == "Running", 60)
    patch = json.dumps({"spec": {"runPolicy": {"suspend": True}}})
    local_cluster.kubectl("patch", "tj", "pausable", "-n", cluster_namespace, "--type=merge", "-p", patch)
    job_watcher.wait(cluster_namespace, "pausable", lambda s: s.get("phase") == "Suspended", 30)
    assert get(local_cluster, cluster_namespace, "mpijob", "pausable")["spec"]["runPolicy"]["suspend"] is True
    patch = json.dumps({"spec": {"runPolicy": {"suspend": False}}})
    local_cluster.kubectl("patch", "tj", "pausable", "-n", cluster_namespace, "--type=merge", "-p", patch)
    job_watcher.wait(cluster_namespace, "pausable", lambda s: s.get("phase") == "Running", 60)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


def test_metrics_count_reconciles_phases_durations_gpu_seconds_and_failures(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any, operator: Any
) -> None:
    assert httpx.get(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5).status_code == 200
    before = operator.metrics()
    fast = {"launcher": {"annotations": {f"{SIM}run-seconds": "2"}}}
    failing = {"launcher": {"annotations": {f"{SIM}run-seconds": "2", f"{SIM}exit-code": "3"}}}
    apply(local_cluster, cluster_namespace, trainingjob("metered", gpusPerWorker=2, podMetadata=fast))
    apply(local_cluster, cluster_namespace, trainingjob("broken", podMetadata=failing))
    job_watcher.wait(cluster_namespace, "metered", lambda s: s.get("phase") == "Succeeded", 90)
    job_watcher.wait(cluster_namespace, "broken", lambda s: s.get("phase") == "Failed", 90)
    after = operator.metrics()

    def grew(name: str, **labels: str) -> bool:
        return metric(after, name, **labels) > metric(before, name, **labels)

    assert grew("fieldkube_operator_reconcile_total", handler="sync")
    assert grew("fieldkube_operator_reconcile_duration_seconds_count", handler="sync")
    assert grew("fieldkube_trainingjob_time_to_running_seconds_count")
    assert grew("fieldkube_trainingjob_duration_seconds_count", outcome="Succeeded")
    assert grew("fieldkube_trainingjob_duration_seconds_count", outcome="Failed")
    assert metric(after, "fieldkube_trainingjob_gpu_seconds_total", namespace=cluster_namespace) > 0
    assert grew("fieldkube_trainingjob_failures_total", reason="Error")
    assert metric(after, "fieldkube_trainingjobs", phase="Succeeded") >= 1
    assert "fieldkube_operator_reconcile_errors_total" in after


# Two replicas elect a leader on a Lease in the operator's namespace (manifests/rbac/leader-election.yaml); a
# short lease keeps the hand-over after a SIGKILL within seconds.
LEASE_ENV = {"FIELDKUBE_LEASE_DURATION_SECONDS": "4"}


def replica_args(namespace: str) -> tuple[str, ...]:
    return (
        "-n",
        namespace,
        "--lease-namespace",
        "fieldkube-system",
        "--lease-name",
        f"test-{namespace}"[:63],
    )


def created_mpijobs(*replicas: Any) -> Counter[str]:
    """How often each MPIJob's creation was logged, over the replicas' logs."""
    lines = [line for r in replicas for line in r.log_text().splitlines() if "created MPIJob " in line]
    return Counter(line.rsplit("created MPIJob ", 1)[1].split()[0] for line in lines)


LEADING = re.compile(r"leading: lease \S+ held by (\S+)")
AGENT_IDENTITY = re.compile(r"^fieldkube-operator/\S+ \((?P<identity>[^)]+)\)$")


def operator_writes(local_cluster: Any, namespace: str) -> list[tuple[str, str, str]]:
    """(identity, verb, object) of each write the operator made in ``namespace``, in the API server's order.

    From the API server's audit log (the local cluster logs writes to MPIJobs and TrainingJob statuses), so
    a write counts when the API server answered it, whether or not its replica lived to log it. Rejected
    writes count too (a 409 for an MPIJob that exists is a replica acting on a job another one handles).
    """
    writes = []
    for event in local_cluster.audit_events(namespace):
        agent = AGENT_IDENTITY.match(event.get("userAgent", ""))
        if agent is None:
            continue
        ref = event["objectRef"]
        what = f"{ref['resource']}/{ref.get('subresource', '')}/{ref.get('name', '')}"
        writes.append((event["stageTimestamp"], agent["identity"], event["verb"], what))
    return [(identity, verb, what) for _, identity, verb, what in sorted(writes)]


def test_replicas_killed_and_restarted_reconcile_every_job_exactly_once(
    local_cluster: Any, cluster_namespace: str, operator_factory: Any, tmp_path: Path, operator: Any
) -> None:
    """50 jobs in flight under two replicas; one or the other is SIGKILLed at random points and restarted."""
    operator.stop()  # only these replicas: the session operator resumes at the end
    jobs = 50
    replicas = [operator_factory(tmp_path / f"replica-{i}.log", LEASE_ENV) for i in range(2)]
    rng = random.Random(4)
    try:
        for replica in replicas:
            replica.start(*replica_args(cluster_namespace))
        docs = [
            trainingjob(
                f"job-{i:02d}",
                gpusPerWorker=0,
                resources={"cpu": "1", "memory": "1Gi"},
                podMetadata={"launcher": {"annotations": {f"{SIM}run-seconds": "2"}}},
            )
            for i in range(jobs)
        ]
        local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump_all(docs))
        for _ in range(4):
            time.sleep(rng.uniform(0.2, 5.0))
            victim = rng.choice(replicas)
            victim.kill()
            victim.start(*replica_args(cluster_namespace))

        def all_finished() -> bool:
            items = local_cluster.get_json("trainingjobs", namespace=cluster_namespace)["items"]
            return len(items) == jobs and all(
                (i.get("status") or {}).get("phase") == "Succeeded" for i in items
            )

        local_cluster.wait_for("every job Succeeded", all_finished, timeout=300, interval=1)
        tjs = {
            i["metadata"]["name"]: i
            for i in local_cluster.get_json("trainingjobs", namespace=cluster_namespace)["items"]
        }
        # no duplicate children: one MPIJob per TrainingJob, owned by it, its spec written once
        mpijobs = local_cluster.get_json("mpijobs", namespace=cluster_namespace)["items"]
        assert sorted(m["metadata"]["name"] for m in mpijobs) == sorted(tjs)
        for mpijob in mpijobs:
            owner = mpijob["metadata"]["ownerReferences"]
            assert [o["uid"] for o in owner] == [tjs[mpijob["metadata"]["name"]]["metadata"]["uid"]]
            assert mpijob["metadata"]["generation"] == 1, mpijob["metadata"]
        # each MPIJob ran once: one launcher Job each, owned by that MPIJob
        mpijob_uids = {m["metadata"]["uid"] for m in mpijobs}
        launchers = local_cluster.get_json("jobs.batch", namespace=cluster_namespace)["items"]
        owners = Counter(j["metadata"]["ownerReferences"][0]["uid"] for j in launchers)
        assert set(owners) == mpijob_uids and set(owners.values()) == {1}, owners
        # no lost status: every job carries its final status in full; no finalizer on any of them
        for tj in tjs.values():
            status = tj["status"]
            assert status["mpiJobName"] == tj["metadata"]["name"] and status["completionTime"], status
            assert status["startTime"] and status["observedGeneration"] == 1, status
            conditions = {c["type"]: c["status"] for c in status["conditions"]}
            assert conditions["Created"] == conditions["Succeeded"] == "True", status
            assert not tj["metadata"].get("finalizers"), tj["metadata"]
        # a create that succeeded is logged once over both replicas (a kill may land between the API's
        # answer and the log line, so some may be missing, never doubled)
        names = created_mpijobs(*replicas)
        assert set(names) <= set(tjs) and set(names.values()) <= {1}, names
        assert not any(RBAC_DENIAL.search(r.log_text()) for r in replicas)
        # Never two at once: the writes, in the order the API server took them, come in one run per
        # replica process (a process that lost the Lease is dead here, and a new one has a new identity),
        # each run from a process that logged winning the Lease, and no more runs than Lease holders.
        writes = operator_writes(local_cluster, cluster_namespace)
        assert {w[2].split("/")[0] for w in writes} == {"mpijobs", "trainingjobs"}, writes[:5]
        runs = [
            identity for i, (identity, _, _) in enumerate(writes) if i == 0 or writes[i - 1][0] != identity
        ]
        assert len(runs) == len(set(runs)), f"replicas took turns writing: {len(runs)} runs, {runs[:6]}"
        leaders = {m for r in replicas for m in LEADING.findall(r.log_text())}
        assert set(runs) <= leaders, (runs, leaders)
        lease = local_cluster.get_json(
            "lease", f"test-{cluster_namespace}"[:63], namespace="fieldkube-system"
        )
        assert len(runs) <= lease["spec"].get("leaseTransitions", 0) + 1, (runs, lease["spec"])
    finally:
        for replica in replicas:
            replica.stop()
        operator.start("--standalone")


def test_two_replicas_elect_one_leader_and_hand_over_when_it_stops(
    local_cluster: Any, cluster_namespace: str, operator_factory: Any, tmp_path: Path, operator: Any
) -> None:
    """Only the Lease's holder acts; a clean stop releases the Lease and the other takes over at once."""
    operator.stop()
    first = operator_factory(tmp_path / "first.log", LEASE_ENV)
    second = operator_factory(tmp_path / "second.log", LEASE_ENV)
    launcher = {"launcher": {"annotations": {f"{SIM}run-seconds": "2"}}}

    def all_succeeded(docs: list[dict[str, Any]]) -> bool:
        return all(
            (
                (get(local_cluster, cluster_namespace, "tj", d["metadata"]["name"]) or {}).get("status") or {}
            ).get("phase")
            == "Succeeded"
            for d in docs
        )

    try:
        first.start(*replica_args(cluster_namespace))
        local_cluster.wait_for("the first replica to lead", lambda: "leading: lease" in first.log_text(), 30)
        second.start(*replica_args(cluster_namespace))
        lease = json.loads(
            local_cluster.kubectl(
                "get", "lease", f"test-{cluster_namespace}"[:63], "-n", "fieldkube-system", "-o", "json"
            ).stdout
        )
        docs = [trainingjob(f"a-{i}", gpusPerWorker=0, podMetadata=launcher) for i in range(3)]
        local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump_all(docs))
        local_cluster.wait_for("the first batch Succeeded", lambda: all_succeeded(docs), timeout=120)
        assert "leading: lease" not in second.log_text()
        assert "created MPIJob" not in second.log_text()
        assert lease["spec"]["holderIdentity"] in first.log_text()
        first.stop()  # a clean stop releases the Lease: the second replica takes over within a retry period
        local_cluster.wait_for(
            "the second replica to lead", lambda: "leading: lease" in second.log_text(), 10
        )
        more = [trainingjob(f"b-{i}", gpusPerWorker=0, podMetadata=launcher) for i in range(3)]
        local_cluster.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=yaml.safe_dump_all(more))
        local_cluster.wait_for("the second batch Succeeded", lambda: all_succeeded(more), timeout=120)
        assert created_mpijobs(first) == Counter({f"a-{i}": 1 for i in range(3)})
        assert created_mpijobs(second) == Counter({f"b-{i}": 1 for i in range(3)})
    finally:
        first.stop()
        second.stop()
        operator.start("--standalone")


def test_a_deleted_mpijob_is_created_again(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    doc = trainingjob("resilient", podMetadata={"launcher": {"annotations": {f"{SIM}run-seconds": "600"}}})
    apply(local_cluster, cluster_namespace, doc)
    job_watcher.wait(cluster_namespace, "resilient", lambda s: s.get("phase") == "Running", 60)
    first = get(local_cluster, cluster_namespace, "mpijob", "resilient")
    local_cluster.kubectl("delete", "mpijob", "resilient", "-n", cluster_namespace, "--wait=true", timeout=60)
    local_cluster.wait_for(
        "the MPIJob created again",
        lambda: (
            (get(local_cluster, cluster_namespace, "mpijob", "resilient") or {})
            .get("metadata", {})
            .get("uid", first["metadata"]["uid"])
            != first["metadata"]["uid"]
        ),
        timeout=30,
    )
    job_watcher.wait(cluster_namespace, "resilient", lambda s: s.get("phase") == "Running", 60)


def test_with_the_operator_stopped_jobs_and_their_namespace_still_delete(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any, operator: Any
) -> None:
    """No finalizer: deletion never waits for the operator; the MPIJob goes by its owner reference."""
    doc = trainingjob("orphan", podMetadata={"launcher": {"annotations": {f"{SIM}run-seconds": "600"}}})
    apply(local_cluster, cluster_namespace, doc)
    job_watcher.wait(cluster_namespace, "orphan", lambda s: s.get("phase") == "Running", 60)
    assert not get(local_cluster, cluster_namespace, "tj", "orphan")["metadata"].get("finalizers")
    apply(local_cluster, cluster_namespace, trainingjob("second"))
    operator.stop()
    try:
        local_cluster.kubectl("delete", "tj", "orphan", "-n", cluster_namespace, "--wait=true", timeout=30)
        local_cluster.wait_for(
            "the MPIJob garbage-collected",
            lambda: get(local_cluster, cluster_namespace, "mpijob", "orphan") is None,
            timeout=30,
        )
        local_cluster.kubectl("delete", "namespace", cluster_namespace, "--wait=true", timeout=60)
    finally:
        operator.start("--standalone")


def test_the_operator_service_account_has_least_privilege(local_cluster: Any) -> None:
    """What the ClusterRole grants is what the operator uses; everything else is denied."""
    who = "--as=system:serviceaccount:fieldkube-system:fieldkube-operator"

    def can(*args: str) -> bool:
        result = local_cluster.kubectl("auth", "can-i", *args, who, check=False)
        return result.stdout.strip() == "yes"

    assert can("create", "mpijobs.kubeflow.org", "-n", "any")
    assert can("patch", "trainingjobs.fieldkube.io/status", "-n", "any")
    assert can("get", "pods", "--subresource=log", "-n", "any")
    assert can("update", "leases.coordination.k8s.io", "-n", "fieldkube-system")
    for verb, resource in (
        ("delete", "mpijobs.kubeflow.org"),
        ("get", "pods"),
        ("patch", "events"),
        ("update", "leases.coordination.k8s.io"),  # only in its own namespace (below: "any")
        ("create", "pods"),
        ("delete", "pods"),
        ("get", "secrets"),
        ("create", "trainingjobs.fieldkube.io"),
        ("update", "mpijobs.kubeflow.org"),
        ("create", "jobs.batch"),
        ("delete", "namespaces"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ):
        assert not can(verb, resource, "-n", "any"), f"the operator may {verb} {resource}"


def test_a_missing_permission_shows_as_a_denial_and_no_child(
    local_cluster: Any, cluster_namespace: str, operator_factory: Any, operator: Any, tmp_path: Path
) -> None:
    """The check below can fail: the same ClusterRole without `create mpijobs` leaves the job childless."""
    role = yaml.safe_load((ROOT / "manifests/rbac/clusterrole.yaml").read_text())
    for rule in role["rules"]:
        if rule["resources"] == ["mpijobs"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    role["metadata"]["name"] = "fieldkube-operator-without-create"
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "fieldkube-operator-without-create"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": "fieldkube-operator", "namespace": cluster_namespace}
        ],
    }
    local_cluster.apply([role, binding])
    kubeconfig = local_cluster.service_account_kubeconfig(cluster_namespace, "fieldkube-operator")
    operator.stop()
    reduced = operator_factory(tmp_path / "operator.log", kubeconfig=kubeconfig)
    try:
        reduced.start("--standalone", "-n", cluster_namespace)
        apply(local_cluster, cluster_namespace, trainingjob("childless"))
        denial = re.compile(RBAC_DENIAL.pattern.replace("fieldkube-system", re.escape(cluster_namespace)))
        local_cluster.wait_for("the denial in the log", lambda: denial.search(reduced.log_text()), timeout=60)
        assert get(local_cluster, cluster_namespace, "mpijob", "childless") is None
    finally:
        reduced.stop()
        local_cluster.kubectl(
            "delete", "clusterrolebinding,clusterrole", role["metadata"]["name"], check=False
        )
        operator.start("--standalone")


def test_the_operator_was_never_denied_by_rbac(operator: Any) -> None:
    """Runs after the tests above: a permission the ClusterRole lacks shows as a 403 in the log."""
    denied = [line for line in operator.log_text().splitlines() if RBAC_DENIAL.search(line)]
    assert not denied, "\n".join(denied[:10])


def test_pods_refused_at_admission_show_in_the_status_within_seconds(
    local_cluster: Any, cluster_namespace: str, job_watcher: Any
) -> None:
    """A ResourceQuota refuses the worker pod: the mpi-operator's Warning event, read from the operator's
    events watch, is the job's pending reason within 10 s (before: NotStarted until the pending timeout)."""
    local_cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-pods", "namespace": cluster_namespace},
            "spec": {"hard": {"pods": "0"}},
        }
    )
    apply(local_cluster, cluster_namespace, trainingjob("refused", gpusPerWorker=0))
    applied = time.monotonic()
    status = job_watcher.wait(cluster_namespace, "refused", lambda s: s.get("reason") == "QuotaExceeded", 30)
    assert time.monotonic() - applied <= 10, time.monotonic() - applied
    assert status["phase"] == "Pending" and "exceeded quota" in status["message"], status
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "QuotaExceeded"), scheduled
