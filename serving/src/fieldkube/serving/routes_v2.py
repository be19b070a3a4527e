"""Open Inference Protocol v2 (KServe / Triton HTTP) for both models, so existing clients work unchanged.

Models answer to their task name (`counter`, `segmenter`) and to their registered name
(`fieldkube-counter`, …). Input: `image`, UINT8, [H, W, 3] or [B, H, W, 3]. Request parameters: `tile`,
`overlap`, and for the segmenter `threshold`. Outputs: counter `count` FP32 [B] and `density` FP32
[B, H, W]; segmenter `building_fraction` FP32 [B], `mask` UINT8 [B, H, W], `probability` FP32 [B, H, W].
Errors are 400 (404 for an unknown model) with body {"error": message}. Parsing and serialising run in
worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from fieldkube.serving.errors import ApiError
from fieldkube.serving.inference import MAX_TILE, MIN_TILE, PixelMap
from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.oip import (
    INPUT_NAME,
    InferRequest,
    ProtocolError,
    build_response,
    float_parameter,
    int_parameter,
    parse_infer_request,
)
from fieldkube.serving.served_model import ServedModel, Task
from fieldkube.serving.service import Service, get_service
from fieldkube.serving.uploads import read_limited

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

OUTPUTS: dict[Task, list[tuple[str, str, list[int]]]] = {
    "counter": [("count", "FP32", [-1]), ("density", "FP32", [-1, -1, -1])],
    "segmenter": [
        ("building_fraction", "FP32", [-1]),
        ("mask", "UINT8", [-1, -1, -1]),
        ("probability", "FP32", [-1, -1, -1]),
    ],
}

DEFAULT_OUTPUTS: dict[Task, list[str]] = {"counter": ["count"], "segmenter": ["building_fraction"]}
"""What a request that names no outputs gets: the per-image summaries. The full-resolution maps (a 20 MP
FP32 map is 80 MB raw, several times that as JSON) only when named in `outputs`."""


def _server_version() -> str:
    try:
        return version("fieldkube-serving")
    except PackageNotFoundError:
        return "0"


class ErrorBody(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    name: str = Field(examples=[INPUT_NAME])
    shape: list[int] = Field(examples=[[1, 64, 64, 3]])
    datatype: str = Field(examples=["UINT8"])
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequestBody(BaseModel):
    """The JSON part of an infer request (documentation; the body is parsed by the protocol module)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad request: wrong shape, datatype, data or parameters"},
    404: {"model": ErrorBody, "description": "no such model"},
    413: {"model": ErrorBody, "description": "body too large"},
    429: {"model": ErrorBody, "description": "queue full: retry after Retry-After seconds"},
    503: {"model": ErrorBody, "description": "model not ready, or timed out"},
    500: {"model": ErrorBody, "description": "unexpected failure inside the server (e.g. out of memory)"},
}


def _task_for(service: Service, name: str) -> Task:
    for task in service.registry.tasks():
        if name == task:
            return task
        try:
            if service.registry.get(task).name == name:
                return task
        except LookupError:
            continue
    known = sorted({*service.registry.tasks(), *(_names(service))})
    raise ApiError(404, f"unknown model {name!r}: this server serves {', '.join(known)}")


def _names(service: Service) -> list[str]:
    names = []
    for task in service.registry.tasks():
        try:
            names.append(service.registry.get(task).name)
        except LookupError:
            continue
    return names


def _check_version(model: ServedModel, requested: str | None) -> None:
    if requested is not None and requested != model.version:
        raise ApiError(
            404, f"model {model.name!r} has no version {requested!r} loaded; serving {model.version!r}"
        )


@router.get("/health/live", responses=_ERRORS)
async def live() -> dict[str, bool]:
    """The process answers."""
    return {"live": True}


@router.get("/health/ready", responses=_ERRORS)
async def ready(service: Annotated[Service, Depends(get_service)]) -> JSONResponse:
    """Every configured model is loaded and warmed up (stays true across hot reloads)."""
    ok = service.registry.ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("", response_model=ServerMetadata, responses=_ERRORS)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(
        name="fieldkube-serve", version=_server_version(), extensions=["binary_tensor_data"]
    )


def _metadata(model: ServedModel) -> ModelMetadata:
    return ModelMetadata(
        name=model.name,
        versions=[model.version],
        platform="pytorch",
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="UINT8", shape=[-1, -1, -1, 3])],
        outputs=[TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in OUTPUTS[model.task]],
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=_ERRORS)
async def model_metadata(name: str, service: Annotated[Service, Depends(get_service)]) -> ModelMetadata:
    return _metadata(service.registry.get(_task_for(service, name)))


@router.get("/models/{name}/versions/{model_version}", response_model=ModelMetadata, responses=_ERRORS)
async def model_version_metadata(
    name: str, model_version: str, service: Annotated[Service, Depends(get_service)]
) -> ModelMetadata:
    model = service.registry.get(_task_for(service, name))
    _check_version(model, model_version)
    return _metadata(model)


async def _model_ready(service: Service, name: str, model_version: str | None) -> JSONResponse:
    task = _task_for(service, name)
    try:
        model = service.registry.get(task)
    except LookupError:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    _check_version(model, model_version)
    return JSONResponse({"name": model.name, "ready": True})


@router.get("/models/{name}/ready", responses=_ERRORS)
async def model_ready(name: str, service: Annotated[Service, Depends(get_service)]) -> JSONResponse:
    return await _model_ready(service, name, None)


@router.get("/models/{name}/versions/{model_version}/ready", responses=_ERRORS)
async def model_version_ready(
    name: str, model_version: str, service: Annotated[Service, Depends(get_service)]
) -> JSONResponse:
    return await _model_ready(service, name, model_version)


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequestBody"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: JSON header (Inference-Header-Content-Length bytes) "
                "followed by the raw tensor bytes",
            },
        },
    }
}


@dataclass(frozen=True)
class _Parsed:
    request: InferRequest
    tile: int | None
    overlap: int | None
    threshold: float
    wanted: list[str]


def _parse(body: bytes, header_length: str | None, max_pixels: int, model: ServedModel) -> _Parsed:
    """Validate the request (a full-size JSON tensor takes seconds to parse: run in a worker thread)."""
    try:
        parsed = parse_infer_request(body, header_length, max_pixels)
        tile = int_parameter(parsed.parameters, "tile", MIN_TILE, MAX_TILE)
        overlap = int_parameter(parsed.parameters, "overlap", 0, MAX_TILE // 2)
        threshold = float_parameter(parsed.parameters, "threshold", 0.0, 1.0, 0.5)
        known = [n for n, _, _ in OUTPUTS[model.task]]
        wanted = parsed.outputs if parsed.outputs is not None else DEFAULT_OUTPUTS[model.task]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ProtocolError(
                f"unknown output {unknown[0]!r}: model {model.name!r} has outputs {', '.join(known)}"
            )
    except ProtocolError as error:
        raise ApiError(400, str(error)) from None
    return _Parsed(parsed, tile, overlap, threshold, wanted)


def _serialise(
    parsed: _Parsed, model: ServedModel, results: list[PixelMap], metrics: ServeMetrics
) -> tuple[bytes, int | None]:
    """Outputs and the response body (seconds for full-size FP32 maps as JSON: run in a worker thread).
    Only the outputs asked for are computed, each where the maps are (a mask on the device, not a
    float32 map copied back first)."""
    tensors: dict[str, np.ndarray] = {}
    masks: list[tuple[np.ndarray, int]] = []
    if {"mask", "building_fraction"} & set(parsed.wanted):
        masks = [m.mask(parsed.threshold) for m in results]
    for out in parsed.wanted:
        if out == "count":
            counts = np.array([m.total() for m in results], dtype=np.float32)
            for c in counts[np.isfinite(counts)]:
                metrics.predicted_count.observe(max(float(c), 0.0))
            tensors[out] = counts
        elif out in {"density", "probability"}:
            tensors[out] = np.stack([m.host() for m in results])
        elif out == "mask":
            tensors[out] = np.stack([mask for mask, _ in masks])
        elif out == "building_fraction":
            fractions = np.array([pixels / mask.size for mask, pixels in masks], dtype=np.float32)
            for f in fractions:
                metrics.mask_fraction.observe(float(f))
            tensors[out] = fractions
    return build_response(parsed.request, model.name, model.version, tensors)


async def _infer(request: Request, service: Service, name: str, model_version: str | None) -> Response:
    task = _task_for(service, name)
    model = service.registry.get(task)
    _check_version(model, model_version)
    body = await read_limited(request, service.settings.max_upload_bytes)
    # Parsing and serialising are CPU work on large arrays: off the event loop, so health probes and
    # other requests are answered meanwhile.
    parsed = await asyncio.to_thread(
        _parse,
        body,
        request.headers.get("inference-header-content-length"),
        service.settings.max_pixels,
        model,
    )
    del body
    images = parsed.request.images
    count, height, width = images.shape[:3]
    with service.pixels.admit(count * height * width, model.task, f"{count} image(s) of {width}x{height}"):
        results = await service.predict_batch(model, images, parsed.tile, parsed.overlap)
        payload, header_length = await asyncio.to_thread(_serialise, parsed, model, results, service.metrics)
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


@router.post(
    "/models/{name}/infer", response_model=InferenceResponseBody, responses=_ERRORS, openapi_extra=_INFER_DOC
)
async def infer(name: str, request: Request, service: Annotated[Service, Depends(get_service)]) -> Response:
    return await _infer(request, service, name, None)


@router.post(
    "/models/{name}/versions/{model_version}/infer",
    response_model=InferenceResponseBody,
    responses=_ERRORS,
    openapi_extra=_INFER_DOC,
)
async def infer_version(
    name: str, model_version: str, request: Request, service: Annotated[Service, Depends(get_service)]
) -> Response:
    return await _infer(request, service, name, model_version)
