"""Shared fixtures for the trainer's integration tests: a tiny prepared dataset, a real MLflow server,
and a runner for the real `fieldkube-train` CLI under no launcher, horovodrun or torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fieldkube.trainer.prepare import run as prepare

BIN = Path(sys.executable).parent

# Small and fast on 2 cores: 32-pixel tiles, global batch 4, CPU threads pinned to 1 per process.
FAST = [
    "--set", "train.batch_size=4",
    "--set", "train.batch_mode=global",
    "--set", "data.loader_workers=0",
    "--set", "runtime.threads=1",
    "--set", "metrics.port=0",
    "--set", "train.log_every_steps=2",
    "--set", "train.evaluate=false",
    "--set", "tracking.system_metrics=false",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["HOROVOD_GLOO_IFACE"] = "lo"
    env["OMPI_MCA_btl_tcp_if_include"] = "lo"
    env["OMPI_MCA_oob_tcp_if_include"] = "lo"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


LAUNCHERS: dict[str, Callable[[], list[str]]] = {
    "single": lambda: [str(BIN / "fieldkube-train")],
    "horovod": lambda: [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
                        "--network-interface", "lo", str(BIN / "fieldkube-train")],
    "ddp": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                    "-m", "fieldkube.trainer.cli", "--set", "runtime.backend=ddp"],
}  # fmt: skip


def run_train(
    launcher: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run fieldkube-train to completion under a launcher; returns the finished process."""
    cmd = LAUNCHERS[launcher]() + args
    return subprocess.run(
        cmd, env=env or trainer_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def field_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train / 12 test synthetic field tiles of 32x32 (6 images of 64x96), no bin balancing."""
    root = tmp_path_factory.mktemp("field-data")
    args = ["--synthetic", "field", "--num-images", "6", "--image-size", "64x96", "--tile", "32"]
    prepare([*args, "--no-balance", "--workers", "1", "--seed", "3", "--out", str(root)])
    return root


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and served artifacts in a tmp dir."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=trainer_env(), start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:  # a throw-away server: no need to wait long for its workers to drain
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def train_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_train


@pytest.fixture(scope="session")
def fast_args() -> list[str]:
    return list(FAST)


@pytest.fixture(scope="session")
def env() -> Callable[..., dict[str, str]]:
    return trainer_env


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
