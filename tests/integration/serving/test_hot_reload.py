"""Models from the MLflow registry by alias: an alias switch under continuous load fails no request, and a
bad new version is rejected while the old one keeps serving.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from fieldkube.vision.bundle import WEIGHTS_FILE


def _load(url: str, data: bytes, stop: threading.Event, seen: Counter[str], failures: list[str]) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            try:
                response = session.post(f"{url}/v1/count", data=data, timeout=60)
            except requests.RequestException as error:
                failures.append(repr(error))
                continue
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text}")
                continue
            seen[response.json()["model"]["version"]] += 1


def _watch_readiness(url: str, stop: threading.Event, statuses: Counter[int]) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            statuses[session.get(f"{url}/v2/health/ready", timeout=10).status_code] += 1
            time.sleep(0.02)


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_alias_switch_under_load_fails_no_request(
    mlflow_server, register, start_server, bundles, images, tmp_path
):
    name = "fieldkube-counter-reload"
    first = register(mlflow_server.url, name, bundles.counter, alias="champion")
    second = register(mlflow_server.url, name, bundles.counter_v2)
    server = start_server(
        counter=f"models:/{name}@champion", mlflow_tracking_uri=mlflow_server.url, poll_interval_s=0.2
    )
    assert requests.get(f"{server.url}/v2/models/{name}", timeout=10).json()["versions"] == [first]

    data = images.png(images.field(31, 96, 96, 6))
    stop = threading.Event()
    seen: Counter[str] = Counter()
    failures: list[str] = []
    readiness: Counter[int] = Counter()
    workers = [
        threading.Thread(target=_load, args=(server.url, data, stop, seen, failures)) for _ in range(3)
    ]
    workers.append(threading.Thread(target=_watch_readiness, args=(server.url, stop, readiness)))
    for worker in workers:
        worker.start()
    try:
        assert _wait_for(lambda: seen[first] >= 10, 60)
        MlflowClient(mlflow_server.url).set_registered_model_alias(name, "champion", second)
        switched = _wait_for(lambda: seen[second] >= 10, 60)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert switched, dict(seen)
    assert failures == []
    assert set(readiness) == {200}, dict(readiness)
    assert sum(readiness.values()) > 10
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    info = f'architecture="counter-mcnn",name="{name}",task="counter",version="{second}"'
    assert f"fieldkube_serve_model_info{{{info}}} 1.0" in metrics
    assert f'version="{first}"' not in metrics

    # A broken version: the alias moves to it, the server rejects it and keeps serving the last good one.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(bundles.counter).iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    bad = register(mlflow_server.url, name, broken, alias="champion")
    assert _wait_for(
        lambda: (
            'fieldkube_serve_model_reloads_total{outcome="rejected",task="counter"} 1.0'
            in requests.get(f"{server.url}/metrics", timeout=10).text
        ),
        60,
    )
    response = requests.post(f"{server.url}/v1/count", data=data, timeout=60)
    assert response.status_code == 200
    assert response.json()["model"]["version"] == second != bad
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def test_serving_a_pinned_registry_version(mlflow_server, register, start_server, bundles, images) -> None:
    name = "fieldkube-segmenter-pinned"
    version = register(mlflow_server.url, name, bundles.segmenter)
    server = start_server(segmenter=f"models:/{name}/{version}", mlflow_tracking_uri=mlflow_server.url)
    body = requests.post(
        f"{server.url}/v1/segment", data=images.png(images.aerial(5, 64, 64)), timeout=60
    ).json()
    assert body["model"] == {"name": name, "version": version, "architecture": "segmenter-unet"}


def test_alias_that_resolves_to_nothing_keeps_the_server_unready_with_the_reason(
    mlflow_server, start_server, bundles, images
) -> None:
    server = start_server(
        wait_ready=False,
        counter="models:/fieldkube-no-such-model@champion",
        segmenter=str(bundles.segmenter),
        mlflow_tracking_uri=mlflow_server.url,
        poll_interval_s=0.5,
    )
    data = images.png(images.field(1, 64, 64, 2))
    assert _wait_for(lambda: requests.get(f"{server.url}/v2/models/segmenter/ready", timeout=10).ok, 60)
    assert _wait_for(
        lambda: "cannot resolve" in requests.post(f"{server.url}/v1/count", data=data, timeout=10).text, 60
    )
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 503
    response = requests.post(f"{server.url}/v1/count", data=data, timeout=10)
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert (
        "the counter model is not ready: cannot resolve models:/fieldkube-no-such-model@champion"
        in (response.json()["error"])
    )
    segmented = requests.post(
        f"{server.url}/v1/segment", data=images.png(images.aerial(1, 64, 64)), timeout=60
    )
    assert segmented.status_code == 200
