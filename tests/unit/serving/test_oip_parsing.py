"""Open Inference Protocol request parsing: every malformed request names what was wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fieldkube.serving.oip import ProtocolError, build_response, parse_infer_request


def _request(**input_fields: object) -> bytes:
    spec = {"name": "image", "shape": [2, 2, 3], "datatype": "UINT8", "data": list(range(12)), **input_fields}
    return json.dumps({"inputs": [spec]}).encode()


def test_json_tensor_is_decoded_to_a_batch_of_uint8_images() -> None:
    parsed = parse_infer_request(_request(), None, max_pixels=100)
    assert parsed.images.shape == (1, 2, 2, 3)
    assert parsed.images.dtype == np.uint8
    assert parsed.images.ravel().tolist() == list(range(12))


def test_binary_tensor_follows_the_json_header() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 2, 2, 3],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    ).encode()
    raw = bytes(range(12))
    parsed = parse_infer_request(header + raw, str(len(header)), max_pixels=100)
    assert parsed.images.tobytes() == raw


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"datatype": "FP32"}, "datatype 'FP32' is not supported; expected 'UINT8'"),
        ({"shape": [2, 2, 4]}, "shape [2, 2, 4] is not supported"),
        ({"shape": "2x2"}, "'shape' must be a list of integers"),
        ({"data": list(range(11))}, "'data' has 11 values but shape [2, 2, 3] needs 12"),
        ({"data": [300] * 12}, "values must be within 0..255"),
        ({"data": [0.5] * 12}, "'data' must hold integers"),
        ({"name": "pixels"}, "unknown input 'pixels'"),
    ],
)
def test_bad_input_tensor_is_refused_with_the_field_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_infer_request(_request(**fields), None, max_pixels=100)


def test_header_length_larger_than_the_body_is_refused() -> None:
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length is 999"):
        parse_infer_request(_request(), "999", max_pixels=100)


def test_binary_size_mismatch_is_refused() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [2, 2, 3],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="needs 12 bytes"):
        parse_infer_request(header + b"\x00" * 5, str(len(header)), max_pixels=100)


def test_pixel_limit_applies_to_tensors() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit of 3"):
        parse_infer_request(_request(), None, max_pixels=3)


def test_not_json_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_infer_request(b"\xff\x00garbage", None, max_pixels=100)


def test_response_puts_binary_outputs_after_the_json_header() -> None:
    header = json.dumps(
        {
            "inputs": json.loads(_request())["inputs"],
            "outputs": [{"name": "count", "parameters": {"binary_data": True}}, {"name": "mask"}],
        }
    ).encode()
    parsed = parse_infer_request(header, None, max_pixels=100)
    count = np.array([1.5], dtype=np.float32)
    mask = np.ones((1, 2, 2), dtype=np.uint8)
    body, header_length = build_response(parsed, "m", "3", {"count": count, "mask": mask})
    assert header_length is not None
    head = json.loads(body[:header_length])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 4
    assert head["outputs"][1]["data"] == [1, 1, 1, 1]
    assert np.frombuffer(body[header_length:], dtype="<f4").tolist() == [1.5]
