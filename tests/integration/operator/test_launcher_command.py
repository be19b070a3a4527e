"""The MPIJob's launcher command, run on this machine, trains for real and reports to a real MLflow server.

The argv and env the builder gives the launcher container, with these differences: the hostfile (the
mpi-operator writes /etc/mpi/hostfile in the pod; here it lists localhost with the job's slots), the
ranks' metrics servers, moved by two trailing `--set` overrides from the pod's fixed port 9400 on every
interface to free loopback ports (this machine is shared), and, when the tests run as root, OpenMPI's
opt-in to run as root (the pod runs as uid 1000, so the command has no `--allow-run-as-root`). The ranks
start on localhost, so the command's ssh options (port 2222) are not exercised here. Paths in the spec
are local directories (no PVC), so nothing else in the command line is rewritten. The MLflow server is the
session's (tests/integration/operator/conftest.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fieldkube.operator import mlflow_client
from fieldkube.operator.mpijob_builder import build_mpijob
from fieldkube.operator.spec import parse_spec

BIN = Path(sys.executable).parent


def free_port_pair() -> int:
    """A loopback port p with p + 1 also free: the trainer's two local ranks serve metrics on p and p + 1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free loopback ports")


def test_launcher_command_trains_two_ranks_and_the_operator_reads_the_run(
    tmp_path: Path, mlflow_server: str
) -> None:
    data = tmp_path / "prepared"
    prep = subprocess.run(
        [
            str(BIN / "fieldkube-prepare"),
            "--synthetic",
            "field",
            "--num-images",
            "4",
            "--image-size",
            "224x448",
            "--split",
            "70/30",
            "--workers",
            "1",
            "--seed",
            "1",
            "--out",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    spec = parse_spec(
        {
            "model": {"name": "counter-mcnn", "params": {"width": 0.25}},
            "dataset": {"path": str(data)},
            "training": {
                "train": {"epochs": 1, "batch_size": 2, "log_every_steps": 1},
                "data": {"loader_workers": 0},
                "runtime": {"backend": "horovod", "threads": 1},
            },
            "workers": 2,
            "gpusPerWorker": 0,
            "checkpoint": {"path": str(tmp_path / "ckpt")},
            "mlflow": {
                "trackingUri": mlflow_server,
                "experiment": "launcher-test",
                "registeredModel": "launcher-test",
            },
        }
    )
    uid = "5b1d0c1e-launcher-test"
    mpijob = build_mpijob("launcher-test", "default", uid, spec)
    container = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    slots = mpijob["spec"]["slotsPerWorker"] * mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"localhost slots={slots}\n")
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    env.update(
        {
            "PATH": f"{BIN}:{env['PATH']}",
            "OMPI_MCA_orte_default_hostfile": str(hostfile),
            "OMPI_MCA_btl_tcp_if_include": "lo",
            "OMPI_MCA_oob_tcp_if_include": "lo",
        }
    )
    assert "--allow-run-as-root" not in container["command"]
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    port = free_port_pair()
    command = [*container["command"], "--set", f"metrics.port={port}", "--set", "metrics.address=127.0.0.1"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    assert "rank 1" in output and "rank 0" in output, output  # both ranks ran

    run = mlflow_client.find_run(mlflow_server, "launcher-test", uid)
    assert run is not None, "the run was not tagged with the job uid"
    tracking = mlflow_client.tracking_from_run(mlflow_server, run, 1)
    assert tracking.mlflow.runStatus == "FINISHED"
    assert tracking.progress is not None and tracking.progress.percent == pytest.approx(100.0)
    assert tracking.registered_model is not None and tracking.registered_model.name == "launcher-test"
    assert (tmp_path / "ckpt").is_dir() and any((tmp_path / "ckpt").iterdir())
