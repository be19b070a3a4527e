"""The MPIJob's launcher command, run on this machine, trains for real and reports to a real MLflow server.

Exactly the argv and env the builder gives the launcher container; only the hostfile differs (the
mpi-operator writes /etc/mpi/hostfile in the pod; here it lists localhost with the job's slots). Paths in the
spec are local directories (no PVC), so nothing in the command line is rewritten.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fieldkube.operator import mlflow_client
from fieldkube.operator.mpijob_builder import build_mpijob
from fieldkube.operator.spec import parse_spec

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
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
    log = (root / "mlflow.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"MLflow server did not start: {(root / 'mlflow.log').read_text()[-2000:]}")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


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
    proc = subprocess.run(
        container["command"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
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
