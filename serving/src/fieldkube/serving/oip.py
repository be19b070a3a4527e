"""Open Inference Protocol v2 request parsing and response building, free of HTTP, so it is tested directly.

Supports JSON tensors and the binary tensor data extension: the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensor bytes, inputs marked with
`parameters.binary_data_size`; outputs are returned binary when asked (`parameters.binary_data` on an
output, or `binary_data_output` on the request).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT_NAME = "image"
DTYPES: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype(np.uint8),
    "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"),
}


class ProtocolError(ValueError):
    """A request that breaks the protocol or this model's signature; answered 400 {"error": message}."""


@dataclass
class InferRequest:
    """A parsed infer request: the images (B, H, W, 3) uint8 and what to answer."""

    images: np.ndarray
    id: str | None
    parameters: dict[str, Any]
    outputs: list[str] | None  # None: all outputs
    binary_outputs: set[str] = field(default_factory=set)
    json_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False

    def wants_binary(self, name: str) -> bool:
        if name in self.binary_outputs:
            return True
        return self.binary_default and name not in self.json_outputs


def _parse_header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
        if not 0 < size <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {size} but the body has {len(body)} bytes"
            )
        head, rest = body[:size], body[size:]
    else:
        head, rest = body, b""
    if not head:
        raise ProtocolError("request body is empty: expected a JSON inference request")
    try:
        payload = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ProtocolError("request body must be a JSON object with an 'inputs' list")
    return payload, rest


def _shape(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise ProtocolError(f"input '{INPUT_NAME}': 'shape' must be a list of integers, got {raw!r}")
    shape = tuple(raw)
    if len(shape) not in (3, 4) or shape[-1] != 3 or any(d < 1 for d in shape):
        raise ProtocolError(
            f"input '{INPUT_NAME}': shape {list(shape)} is not supported; expected [H, W, 3] or [B, H, W, 3] "
            "(RGB pixels, every dimension >= 1)"
        )
    return shape


def _json_data(raw: Any, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape)
    try:
        values = np.asarray(raw)
    except ValueError:
        raise ProtocolError(f"input '{INPUT_NAME}': 'data' is ragged; expected {expected} integers") from None
    if values.dtype == object or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ProtocolError(f"input '{INPUT_NAME}': 'data' must hold integers 0..255 for datatype UINT8")
    if values.size != expected:
        raise ProtocolError(
            f"input '{INPUT_NAME}': 'data' has {values.size} values but shape {list(shape)} needs {expected}"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ProtocolError(f"input '{INPUT_NAME}': values must be within 0..255 for datatype UINT8")
    return values.astype(np.uint8).reshape(shape)


def parse_infer_request(body: bytes, header_length: str | None, max_pixels: int) -> InferRequest:
    """Validate and decode an infer request; every problem raises ProtocolError naming the field."""
    payload, binary = _parse_header(body, header_length)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(
            f"'inputs' must be a non-empty list; this model takes one input named '{INPUT_NAME}'"
        )
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"expected exactly one input object named '{INPUT_NAME}', got {len(inputs)}")
    spec = inputs[0]
    if spec.get("name") != INPUT_NAME:
        raise ProtocolError(
            f"unknown input {spec.get('name')!r}: this model takes one input named '{INPUT_NAME}'"
        )
    if spec.get("datatype") != "UINT8":
        raise ProtocolError(
            f"input '{INPUT_NAME}': datatype {spec.get('datatype')!r} is not supported; expected 'UINT8'"
        )
    shape = _shape(spec.get("shape"))
    pixels = math.prod(shape[:-1])
    if pixels > max_pixels:
        batch = f"{shape[0]} images of " if len(shape) == 4 else ""
        raise ProtocolError(
            f"input '{INPUT_NAME}': {batch}{shape[-2]}x{shape[-3]} = {pixels} pixels exceeds the limit of "
            f"{max_pixels} pixels per request"
        )
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"input '{INPUT_NAME}': 'parameters' must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        expected = math.prod(shape)
        if size != expected or len(binary) != expected:
            raise ProtocolError(
                f"input '{INPUT_NAME}': binary_data_size is {size} and {len(binary)} bytes follow the "
                "header, "
                f"but shape {list(shape)} of UINT8 needs {expected} bytes"
            )
        images = np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    else:
        if binary:
            raise ProtocolError(
                f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size"
            )
        if "data" not in spec:
            raise ProtocolError(f"input '{INPUT_NAME}': 'data' is missing")
        images = _json_data(spec["data"], shape)
    if images.ndim == 3:
        images = images[None]
    request_params = payload.get("parameters") or {}
    if not isinstance(request_params, dict):
        raise ProtocolError("'parameters' must be an object")
    outputs_raw = payload.get("outputs")
    outputs: list[str] | None = None
    binary_outputs: set[str] = set()
    json_outputs: set[str] = set()
    if outputs_raw is not None:
        if not isinstance(outputs_raw, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs_raw
        ):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        outputs = [o["name"] for o in outputs_raw]
        for o in outputs_raw:
            o_params = o.get("parameters") or {}
            if not isinstance(o_params, dict):
                raise ProtocolError(f"output {o['name']!r}: 'parameters' must be an object")
            if o_params.get("binary_data") is True:
                binary_outputs.add(o["name"])
            elif o_params.get("binary_data") is False:
                json_outputs.add(o["name"])
    request_id = payload.get("id")
    return InferRequest(
        images=images,
        id=str(request_id) if request_id is not None else None,
        parameters=request_params,
        outputs=outputs,
        binary_outputs=binary_outputs,
        json_outputs=json_outputs,
        binary_default=request_params.get("binary_data_output") is True,
    )


def int_parameter(params: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"parameter {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def float_parameter(params: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = params.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"parameter {name!r} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DTYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"no protocol datatype for {array.dtype}")


def _json_values(array: np.ndarray) -> list[Any]:
    """Flat values for a JSON tensor; NaN and infinity (not JSON) become null."""
    flat = array.ravel()
    values: list[Any] = flat.tolist()
    if np.issubdtype(flat.dtype, np.floating):
        for index in np.flatnonzero(~np.isfinite(flat)).tolist():
            values[index] = None
    return values


def build_response(
    request: InferRequest, model_name: str, model_version: str, tensors: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Response body and, when binary outputs are present, the JSON header length.

    JSON tensors carry NaN and infinity as null (JSON has no such numbers); binary tensors carry the
    IEEE values as they are.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in tensors.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array)}
        if request.wants_binary(name):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_values(array)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    head = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
