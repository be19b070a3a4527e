"""Every failure answers JSON: {"error": ...} on /v1 and /v2 (a crash inside inference too), non-finite
model outputs never break the JSON, and /v2 parses and serialises off the event loop.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from fieldkube.serving import routes_v2
from fieldkube.vision.bundle import save_bundle
from fieldkube.vision.models import build_model


def _strict_json(text: str):
    """json.loads that refuses the NaN/Infinity tokens Python's json would otherwise accept."""

    def refuse(token: str):
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def _infer_json(url: str, image: np.ndarray, outputs: list[str]) -> requests.Response:
    body = {
        "inputs": [
            {"name": "image", "shape": list(image.shape), "datatype": "UINT8", "data": image.ravel().tolist()}
        ],
        "outputs": [{"name": name} for name in outputs],
    }
    return requests.post(f"{url}/v2/models/counter/infer", json=body, timeout=60)


def test_errors_of_v1_v2_and_unknown_paths_are_json_error_objects(server, images) -> None:
    too_small = requests.post(f"{server.url}/v1/count?tile=8", data=images.png(images.field(1, 64, 64, 1)))
    bad_type = requests.post(f"{server.url}/v1/segment", data=b"GIF89a....")
    bad_v2 = requests.post(f"{server.url}/v2/models/counter/infer", data=b"{", timeout=10)
    nowhere = requests.get(f"{server.url}/v1/nothing-here", timeout=10)
    for response, status in ((too_small, 422), (bad_type, 415), (bad_v2, 400), (nowhere, 404)):
        assert response.status_code == status
        body = response.json()
        assert list(body) == ["error"] and body["error"], body


def test_a_crash_inside_inference_is_a_500_with_a_json_error(start_server, bundles, images) -> None:
    running = start_server(counter=str(bundles.counter))
    module = running.app.state.service.registry.get("counter").module

    def out_of_memory(*_: object) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = module.register_forward_pre_hook(out_of_memory)  # the next forward pass fails inside torch
    try:
        v1 = requests.post(f"{running.url}/v1/count", data=images.png(images.field(2, 64, 64, 3)), timeout=60)
        v2 = _infer_json(running.url, images.field(3, 32, 32, 1), ["count"])
    finally:
        handle.remove()
    for response in (v1, v2):
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert "RuntimeError: CUDA out of memory" in response.json()["error"]
    recovered = requests.post(
        f"{running.url}/v1/count", data=images.png(images.field(2, 64, 64, 3)), timeout=60
    )
    assert recovered.status_code == 200


@pytest.fixture(scope="module")
def nan_counter(tmp_path_factory: pytest.TempPathFactory):
    """A counter whose weights pass today's warm-up (finite on a zero tile) but give NaN on real images:
    the first two convolutions of each column scaled by 1e30 overflow to infinity, and inf - inf is NaN.
    """
    torch.manual_seed(0)
    model = build_model("counter-mcnn", width=0.25).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("body.0.0.weight", "body.2.0.weight")):
                parameter.mul_(1e30)
    path = tmp_path_factory.mktemp("nan-counter") / "bundle"
    save_bundle(path, model, "counter-mcnn", {"width": 0.25}, tile=64, density_scale=100.0)
    return path


def test_nan_outputs_become_null_and_the_json_stays_valid(start_server, nan_counter, images) -> None:
    running = start_server(counter=str(nan_counter))
    image = images.field(4, 48, 40, 3)
    v1 = requests.post(f"{running.url}/v1/count", data=images.png(image), timeout=60)
    assert v1.status_code == 200, v1.text
    body = _strict_json(v1.text)
    assert body["count"] is None and body["count_rounded"] is None
    assert all(cell["count"] is None for cell in body["tiles"])
    v2 = _infer_json(running.url, image, ["count", "density"])
    assert v2.status_code == 200, v2.text
    outputs = {out["name"]: out for out in _strict_json(v2.text)["outputs"]}
    assert outputs["count"]["data"] == [None]
    assert len(outputs["density"]["data"]) == 48 * 40 and set(outputs["density"]["data"]) == {None}


def test_health_answers_while_a_v2_response_is_parsed_and_serialised(server, images, monkeypatch) -> None:
    """Parsing and serialising are held until a health probe sent meanwhile is answered: were they on
    the event loop, the probe could not be answered and would time out.
    """
    threads: dict[str, str] = {}
    started = {name: threading.Event() for name in ("parse", "serialise")}
    probed = {name: threading.Event() for name in ("parse", "serialise")}

    def holding(name: str, original):
        def run(*args, **kwargs):
            threads[name] = threading.current_thread().name
            started[name].set()
            probed[name].wait(timeout=30)
            return original(*args, **kwargs)

        return run

    monkeypatch.setattr(routes_v2, "parse_infer_request", holding("parse", routes_v2.parse_infer_request))
    monkeypatch.setattr(routes_v2, "build_response", holding("serialise", routes_v2.build_response))
    image = images.field(5, 256, 256, 8)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_infer_json, server.url, image, ["count", "density"])
        try:
            for name in ("parse", "serialise"):
                assert started[name].wait(timeout=60), f"{name} never started"
                live = requests.get(f"{server.url}/v2/health/live", timeout=10)
                probed[name].set()
                assert live.status_code == 200 and live.json() == {"live": True}
        finally:
            for event in probed.values():
                event.set()
        answer = pending.result(timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["outputs"][1]["data"]) == 256 * 256
    assert server.thread.name not in threads.values()  # the event loop runs in the server's thread
