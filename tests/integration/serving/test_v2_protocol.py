"""Open Inference Protocol v2 through the real tritonclient HTTP client: health, metadata, JSON and binary."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


@pytest.fixture
def client(server):
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield connection
    connection.close()


def _infer(client, model: str, image: np.ndarray, outputs: list[str], binary: bool, **parameters):
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image, binary_data=binary)
    requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(model, [tensor], outputs=requested, parameters=parameters or None)


def test_health_and_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("counter")
    assert client.is_model_ready("segmenter-unet")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("counter")
    assert metadata["name"] == "counter-mcnn"
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert [o["name"] for o in metadata["outputs"]] == ["count", "density"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_count_matches_the_v1_api(client, server, images, binary: bool) -> None:
    image = images.field(11, 96, 128, 7)
    result = _infer(client, "counter", image[None], ["count", "density"], binary)
    count = result.as_numpy("count")
    density = result.as_numpy("density")
    assert count.shape == (1,) and density.shape == (1, 96, 128)
    assert float(density.sum()) == pytest.approx(float(count[0]), rel=1e-4)
    v1 = requests.post(f"{server.url}/v1/count", data=images.png(image), timeout=60).json()
    assert float(count[0]) == pytest.approx(v1["count"], rel=1e-5)
    assert result.get_response()["model_version"] == v1["model"]["version"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_segment_batch_of_two_images(client, images, binary: bool) -> None:
    batch = np.stack([images.aerial(1, 64, 80), images.aerial(2, 64, 80)])
    result = _infer(client, "segmenter", batch, ["building_fraction", "mask"], binary, threshold=0.5)
    fractions = result.as_numpy("building_fraction")
    mask = result.as_numpy("mask")
    assert mask.shape == (2, 64, 80) and mask.dtype == np.uint8
    np.testing.assert_allclose(fractions, mask.reshape(2, -1).mean(axis=1), atol=1e-6)


def test_wrong_datatype_is_a_400_with_an_error_message(client, server) -> None:
    tensor = triton.InferInput("image", [1, 8, 8, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 8, 8, 3), dtype=np.float32), binary_data=False)
    with pytest.raises(InferenceServerException, match="datatype 'FP32' is not supported; expected 'UINT8'"):
        client.infer("counter", [tensor])
    raw = requests.post(
        f"{server.url}/v2/models/counter/infer",
        json={"inputs": [{"name": "image", "shape": [4, 4], "datatype": "UINT8", "data": [0] * 16}]},
        timeout=30,
    )
    assert raw.status_code == 400
    assert "expected [H, W, 3] or [B, H, W, 3]" in raw.json()["error"]


def test_unknown_model_and_output_are_reported(client, server) -> None:
    missing = requests.get(f"{server.url}/v2/models/no-such-model", timeout=10)
    assert missing.status_code == 404
    assert "unknown model 'no-such-model'" in missing.json()["error"]
    with pytest.raises(InferenceServerException, match="unknown output 'mask'"):
        _infer(client, "counter", np.zeros((1, 8, 8, 3), dtype=np.uint8), ["mask"], False)


def test_a_request_naming_no_outputs_gets_only_the_summaries(server, images) -> None:
    """Full-resolution maps are sent only when asked for: by default a count, a building fraction."""
    for model, image, expected in (
        ("counter", images.field(3, 64, 96, 4), ["count"]),
        ("segmenter", images.aerial(4, 64, 96), ["building_fraction"]),
    ):
        body = {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(image.shape),
                    "datatype": "UINT8",
                    "data": image.ravel().tolist(),
                }
            ]
        }
        answer = requests.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        outputs = answer.json()["outputs"]
        assert [out["name"] for out in outputs] == expected and outputs[0]["shape"] == [1]
