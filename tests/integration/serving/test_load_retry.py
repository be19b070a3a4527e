"""A registry or artifact store that cannot be reached for a while is retried with backoff, not taken
as a bad model: the service stays not ready (503) meanwhile and becomes ready by itself once it is back.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
import time
from urllib.parse import urlparse

import requests
from mlflow.tracking import MlflowClient


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _reloads(url: str, outcome: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(
        rf'fieldkube_serve_model_reloads_total{{outcome="{outcome}",task="counter"}} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


def test_unreachable_artifacts_at_start_up_are_retried_until_the_model_loads(
    mlflow_server, register, start_server, bundles, images
) -> None:
    name = "fieldkube-counter-retry"
    version = register(mlflow_server.url, name, bundles.counter, alias="champion")
    source = MlflowClient(mlflow_server.url).get_model_version(name, version).source
    stored = mlflow_server.artifacts / urlparse(source).path.lstrip("/")
    assert stored.is_dir(), stored
    away = stored.with_name("model-unreachable")
    stored.rename(away)  # the artifact store answers 404 for it: a download error, as in an outage
    data = images.png(images.field(21, 64, 64, 4))
    try:
        server = start_server(
            wait_ready=False,
            counter=f"models:/{name}@champion",
            mlflow_tracking_uri=mlflow_server.url,
            poll_interval_s=600,  # so only the backoff can retry within this test
            load_retry_initial_s=0.2,
            load_retry_max_s=0.8,
        )
        assert _wait_for(lambda: _reloads(server.url, "load_failed") >= 3, 60)
        assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 503
        assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
        waiting = requests.post(f"{server.url}/v1/count", data=data, timeout=10)
        assert waiting.status_code == 503 and "Retry-After" in waiting.headers
        assert f"loading version {version} failed" in waiting.json()["error"]
        assert "retrying in" in waiting.json()["error"]
    finally:
        away.rename(stored)
    assert _wait_for(lambda: requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200, 60)
    answer = requests.post(f"{server.url}/v1/count", data=data, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": name, "version": version, "architecture": "counter-mcnn"}
    assert _reloads(server.url, "rejected") == 0
    assert _reloads(server.url, "loaded") == 1


class _Forwarder(socketserver.ThreadingTCPServer):
    """A TCP relay to the MLflow server: the registry as seen through a network that comes back."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", port), _Relay)


class _Relay(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Forwarder)
        with socket.create_connection(server.upstream) as upstream:

            def pipe(source: socket.socket, target: socket.socket) -> None:
                try:
                    while chunk := source.recv(65536):
                        target.sendall(chunk)
                except OSError:
                    pass
                finally:
                    target.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pipe, args=(upstream, self.request), daemon=True)
            back.start()
            pipe(self.request, upstream)
            back.join(timeout=30)


def test_registry_outage_at_start_up_ends_with_the_model_loaded(
    mlflow_server, register, start_server, bundles, images, loopback_port, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each attempt fails at once; ours retry
    name = "fieldkube-counter-outage"
    version = register(mlflow_server.url, name, bundles.counter, alias="champion")
    port = loopback_port()  # nothing listens there yet: connection refused, as when the registry is down
    server = start_server(
        wait_ready=False,
        counter=f"models:/{name}@champion",
        mlflow_tracking_uri=f"http://127.0.0.1:{port}",
        poll_interval_s=600,
        load_retry_initial_s=0.2,
        load_retry_max_s=0.8,
    )
    assert _wait_for(lambda: _reloads(server.url, "resolve_failed") >= 3, 60)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 503
    upstream = urlparse(mlflow_server.url)
    relay = _Forwarder(port, (upstream.hostname or "127.0.0.1", upstream.port or 80))
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        assert _wait_for(
            lambda: requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200, 60
        )
        body = requests.post(f"{server.url}/v1/count", data=images.png(images.field(22, 64, 64, 3))).json()
        assert body["model"]["version"] == version
        assert _reloads(server.url, "rejected") == 0
    finally:
        relay.shutdown()
        relay.server_close()
