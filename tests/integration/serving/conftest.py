"""Fixtures for the service tests: tiny models trained here on synthetic data, a real uvicorn server in a
thread on a free loopback port, and a real MLflow tracking server (sqlite) for registry aliases.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import uvicorn
from PIL import Image

from fieldkube.serving.app import create_app
from fieldkube.serving.settings import ServeSettings
from fieldkube.vision.bundle import save_bundle
from fieldkube.vision.density import density_map_from_points
from fieldkube.vision.models import build_model
from fieldkube.vision.normalize import batch_to_tensor
from fieldkube.vision.synthetic import make_aerial_scene, make_field_image

COUNTER_PARAMS = {"width": 0.25}
SEGMENTER_PARAMS = {"base_channels": 4, "depth": 3, "dropout": 0.0}
TILE = 64
DENSITY_SCALE = 100.0


def train_counter(steps: int, seed: int) -> torch.nn.Module:
    """A small MCNN trained for a few Adam steps on 64x64 synthetic field tiles."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("counter-mcnn", **COUNTER_PARAMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        samples = [make_field_image(rng, TILE, TILE, int(rng.integers(0, 6)), hazards=()) for _ in range(4)]
        images = batch_to_tensor(np.stack([s.image for s in samples]))
        targets = np.stack([density_map_from_points(s.points, (TILE, TILE), sigma=2.0) for s in samples])
        target = torch.from_numpy(targets)[:, None] * DENSITY_SCALE
        loss = torch.nn.functional.mse_loss(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_segmenter(steps: int, seed: int) -> torch.nn.Module:
    """A small U-Net trained for a few Adam steps on 64x64 synthetic aerial tiles."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("segmenter-unet", **SEGMENTER_PARAMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        samples = [make_aerial_scene(rng, TILE, TILE) for _ in range(4)]
        images = batch_to_tensor(np.stack([s.image for s in samples]))
        target = torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.float32))[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@dataclass(frozen=True)
class Bundles:
    counter: Path
    counter_v2: Path
    segmenter: Path


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """Bundles written by the project's own save_bundle: two counter versions and one segmenter."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundles")
    counter = train_counter(steps=25, seed=1)
    save_bundle(
        root / "counter", counter, "counter-mcnn", COUNTER_PARAMS, tile=TILE, density_scale=DENSITY_SCALE
    )
    counter_v2 = train_counter(steps=10, seed=2)
    save_bundle(
        root / "counter-v2",
        counter_v2,
        "counter-mcnn",
        COUNTER_PARAMS,
        tile=TILE,
        density_scale=DENSITY_SCALE,
    )
    segmenter = train_segmenter(steps=25, seed=3)
    save_bundle(root / "segmenter", segmenter, "segmenter-unet", SEGMENTER_PARAMS, tile=TILE)
    return Bundles(root / "counter", root / "counter-v2", root / "segmenter")


class ServerThread:
    """A real uvicorn server running the app in a background thread, on a free 127.0.0.1 port."""

    def __init__(self, settings: ServeSettings) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = ""

    def start(self, ready_timeout_s: float = 60.0, wait_ready: bool = True) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while wait_ready and not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("models did not become ready")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/v2/health/ready", timeout=10).status_code == 200
        except requests.RequestException:  # too busy to answer in time: ask again
            return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Factory: start a server with the given settings; every server started is stopped afterwards."""
    started: list[ServerThread] = []

    def start(wait_ready: bool = True, **fields: Any) -> ServerThread:
        fields.setdefault("torch_threads", 1)
        fields.setdefault("port", 0)
        server = ServerThread(ServeSettings(**fields)).start(wait_ready=wait_ready)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(bundles: Bundles) -> Iterator[ServerThread]:
    """One server with the tiny counter and segmenter from local bundle paths, shared by a module."""
    settings = ServeSettings(
        counter=str(bundles.counter), segmenter=str(bundles.segmenter), torch_threads=1, port=0
    )
    running = ServerThread(settings).start()
    yield running
    running.stop()


class ServeProcess:
    """`fieldkube-serve` (the console script) as its own process on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "fieldkube-serve"), "--port", str(self.port), *args]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120.0) -> ServeProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:  # not listening yet, or too busy to answer
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"fieldkube-serve did not become ready: {self.log_path.read_text()[-2000:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def start_serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory: run `fieldkube-serve ARGS...` until ready; every process started is stopped afterwards."""
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        process = ServeProcess(list(args), tmp_path / f"serve-{len(started)}.log")
        started.append(process)
        return process.wait_ready()

    yield start
    for process in started:
        process.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class MlflowServer:
    url: str
    process: subprocess.Popen[bytes]
    artifacts: Path  # where the server stores artifacts (mlflow-artifacts:/<path> is artifacts/<path>)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (sqlite backend, local artifact store) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    artifacts = root / "artifacts"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (root / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "true"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too busy to answer
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.25)
        yield MlflowServer(url, process, artifacts)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def register_version(tracking_uri: str, name: str, bundle: Path, alias: str | None = None) -> str:
    """Log `bundle` as artifact path `model` of a new run and register it, as the trainer does."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("serving-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("serving-tests")
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(bundle), artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def field_image(seed: int, height: int, width: int, flowers: int) -> np.ndarray:
    return make_field_image(np.random.default_rng(seed), height, width, flowers, hazards=()).image


def aerial_image(seed: int, height: int, width: int) -> np.ndarray:
    return make_aerial_scene(np.random.default_rng(seed), height, width).image


class Images:
    """Image makers and encoders for the tests (a fixture, so test modules need no imports from here)."""

    png = staticmethod(png_bytes)
    jpeg = staticmethod(jpeg_bytes)
    field = staticmethod(field_image)
    aerial = staticmethod(aerial_image)

    @staticmethod
    def tiff(image: np.ndarray) -> bytes:
        import tifffile

        buffer = io.BytesIO()
        tifffile.imwrite(buffer, image)
        return buffer.getvalue()


@pytest.fixture(scope="session")
def images() -> type[Images]:
    return Images


@pytest.fixture(scope="session")
def loopback_port() -> Callable[[], int]:
    return free_port


@pytest.fixture(scope="session")
def register() -> Callable[..., str]:
    return register_version
