"""The domain API: POST /v1/count (flowers) and POST /v1/segment (buildings) on whole field images.

The image comes as a raw body (image/jpeg, image/png, image/tiff) or a multipart upload (field 'file').
`output=json` answers a JSON document; `output=png` the map itself (density heat map or 0/255 mask);
`output=overlay` the map drawn over the image. Every answer names the model and version that made it
(in the JSON body, and in X-Model-Name / X-Model-Version headers).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from fieldkube.serving.encodings import (
    data_url_png,
    encode_array,
    heatmap,
    mask_to_coco_rle,
    mask_to_rle,
    sum_pool,
)
from fieldkube.serving.errors import ApiError
from fieldkube.serving.geo import (
    GEOJSON_MEDIA_TYPE,
    GEOTIFF_MEDIA_TYPE,
    PIXEL_GRID,
    Georeference,
    mask_polygons,
    read_georeference,
    write_geotiff,
)
from fieldkube.serving.inference import MAX_TILE, MIN_TILE
from fieldkube.serving.served_model import ServedModel, Task
from fieldkube.serving.service import Service, get_service
from fieldkube.serving.uploads import decode_image, read_header, receive_upload

router = APIRouter(prefix="/v1", tags=["v1"])

CountOutput = Literal["json", "png", "overlay", "geotiff"]
SegmentOutput = Literal["json", "png", "overlay", "geotiff", "geojson"]

_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the image: a raw JPEG/PNG/TIFF body, or multipart/form-data with the image in "
        "field 'file'",
        "content": {
            "image/jpeg": {"schema": _BINARY},
            "image/png": {"schema": _BINARY},
            "image/tiff": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
            },
        },
    }
}


def _responses(image_description: str, geo: dict[str, str]) -> dict[int | str, dict[str, Any]]:
    error: dict[str, Any] = {"model": ErrorDetail}
    content = {"image/png": {"schema": _BINARY, "description": image_description}}
    content.update({media: {"schema": _BINARY, "description": what} for media, what in geo.items()})
    return {
        200: {"content": content},
        400: {"description": "corrupt or truncated image, or unusable tile options", **error},
        413: {"description": "body or decoded image too large", **error},
        415: {"description": "not a JPEG, PNG or TIFF image", **error},
        422: {"description": "invalid query parameter", **error},
        429: {"description": "queue full: retry after Retry-After seconds", **error},
        503: {"description": "model not ready, or timed out: retry after Retry-After seconds", **error},
        500: {"description": "unexpected failure inside the server (e.g. out of memory)", **error},
    }


class ErrorDetail(BaseModel):
    """Body of every /v1 error (as /v2's)."""

    error: str


class ModelRef(BaseModel):
    """The model that produced a response."""

    name: str = Field(description="registered model name (or the architecture for a local bundle)")
    version: str = Field(description="registry version, or local-<weights hash> for a local bundle")
    architecture: str


class TileCount(BaseModel):
    """Count inside one cell of a regular tile-sized grid (cells do not overlap; they sum to the total)."""

    row: int
    col: int
    box: tuple[int, int, int, int] = Field(description="(y0, x0, y1, x1), half-open, pixels")
    count: float | None = Field(description="null when the model's output is not finite (NaN or infinity)")


class DensityArray(BaseModel):
    """Density map as base64 float16 (little-endian), sum-pooled by `stride` (the sum stays the count)."""

    shape: list[int]
    dtype: str
    byte_order: str
    stride: int
    data: str


class CountResponse(BaseModel):
    """Flowers counted in one image."""

    model: ModelRef
    count: float | None = Field(
        description="sum of the stitched density map; null when it is not finite (NaN or infinity)"
    )
    count_rounded: int | None
    width: int
    height: int
    tile: int
    overlap: int
    tiles: list[TileCount]
    density: DensityArray | None = None
    overlay_png: str | None = Field(
        default=None, description="density heat map over the image, as a data: URL"
    )


class MaskRle(BaseModel):
    """Row-major run lengths of the 0/1 mask, starting with a run of 0s (possibly empty)."""

    size: list[int]
    order: str
    counts: list[int]


class MaskCocoRle(BaseModel):
    """COCO's compressed RLE (column-major runs as a string): `pycocotools.mask.decode` reads it as is."""

    size: list[int] = Field(description="[H, W]")
    counts: str


class SegmentResponse(BaseModel):
    """Buildings found in one image."""

    model: ModelRef
    building_fraction: float = Field(description="share of pixels whose probability >= threshold")
    building_pixels: int
    threshold: float
    width: int
    height: int
    tile: int
    overlap: int
    mask_rle: MaskRle | None = None
    mask_coco_rle: MaskCocoRle | None = None
    mask_png: str | None = Field(default=None, description="0/255 mask PNG as a data: URL")
    overlay_png: str | None = Field(default=None, description="mask over the image, as a data: URL")


TileQuery = Annotated[
    int | None, Query(ge=MIN_TILE, le=MAX_TILE, description="tile size in pixels (default: the model's)")
]
OverlapQuery = Annotated[
    int | None, Query(ge=0, le=MAX_TILE // 2, description="overlap between tiles (default: server setting)")
]


def _model_ref(model: ServedModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version, architecture=model.architecture)


def _model_headers(model: ServedModel) -> dict[str, str]:
    return {"X-Model-Name": model.name, "X-Model-Version": model.version}


def _file_response(
    body: bytes, model: ServedModel, extra: dict[str, str], media_type: str = "image/png"
) -> Response:
    """A map, mask or overlay as the whole answer, with the model's headers."""
    return Response(body, media_type=media_type, headers={**_model_headers(model), **extra})


StretchLowQuery = Annotated[
    float,
    Query(
        ge=0.0,
        lt=100.0,
        description="12/16-bit images: this percentile of the samples becomes 0 (8-bit images are unchanged)",
    ),
]
StretchHighQuery = Annotated[
    float,
    Query(
        gt=0.0,
        le=100.0,
        description="12/16-bit images: this percentile of the samples becomes 255 (above stretch_low)",
    ),
]


@asynccontextmanager
async def _admitted_image(
    request: Request,
    service: Service,
    task: Task,
    stretch_low: float,
    stretch_high: float,
    georeferenced: bool = False,
) -> AsyncIterator[tuple[np.ndarray, Georeference]]:
    """The request's image, decoded only once its pixels fit the service's budget (429 otherwise), and
    (when `georeferenced`) where it lies on the ground; the pixels stay counted until the block, which
    computes the answer, ends."""
    if stretch_low >= stretch_high:
        raise ApiError(
            422,
            f"query parameters 'stretch_low' ({stretch_low}) and 'stretch_high' ({stretch_high}): "
            "stretch_low must be below stretch_high",
        )
    settings = service.settings
    async with receive_upload(request, settings.max_upload_bytes, settings.upload_dir) as upload:
        header = await asyncio.to_thread(read_header, upload, settings.max_pixels)
        with service.pixels.admit(header.pixels, task, f"this {header.width}x{header.height} image"):
            image = await asyncio.to_thread(
                decode_image, upload, header, settings.max_pixels, (stretch_low, stretch_high)
            )
            where = PIXEL_GRID
            if georeferenced:
                where = await asyncio.to_thread(read_georeference, upload.path, header.fmt)
            yield image, where


def _encode_png(array: np.ndarray) -> bytes:
    from fieldkube.vision.imageio import encode_png

    return encode_png(array)


@router.post(
    "/count",
    response_model=CountResponse,
    openapi_extra=IMAGE_BODY,
    responses=_responses(
        "output=png: density heat map; output=overlay: heat map over the image",
        {GEOTIFF_MEDIA_TYPE: "output=geotiff: float32 flowers per pixel, on the input's georeferencing"},
    ),
    summary="Count flowers in a field image",
)
async def count(
    request: Request,
    response: Response,
    service: Annotated[Service, Depends(get_service)],
    output: Annotated[
        CountOutput,
        Query(
            description="json, png (heat map), overlay, or geotiff (the density map on the input's "
            "georeferencing)"
        ),
    ] = "json",
    tile: TileQuery = None,
    overlap: OverlapQuery = None,
    density: Annotated[
        Literal["none", "array", "overlay"], Query(description="include the density map in the JSON")
    ] = "none",
    density_stride: Annotated[int, Query(ge=1, le=64, description="sum-pool the density array by this")] = 1,
    stretch_low: StretchLowQuery = 0.5,
    stretch_high: StretchHighQuery = 99.5,
) -> Any:
    geo = output == "geotiff"
    async with _admitted_image(request, service, "counter", stretch_low, stretch_high, geo) as (image, where):
        density_map, plan, model = await service.predict("counter", image, tile, overlap)
        counted = await asyncio.to_thread(density_map.total)
        finite = math.isfinite(counted)
        if finite:
            service.metrics.predicted_count.observe(max(counted, 0.0))
        headers = {"X-Count": f"{counted:.4f}"}
        if output == "png":
            png = await asyncio.to_thread(lambda: _encode_png(heatmap(np.maximum(density_map.host(), 0))))
            return _file_response(png, model, headers)
        if output == "geotiff":
            tiff = await asyncio.to_thread(
                lambda: write_geotiff(density_map.host(), where, "flowers per pixel")
            )
            return _file_response(tiff, model, headers, GEOTIFF_MEDIA_TYPE)
        if output == "overlay" or density == "overlay":
            from fieldkube.vision.overlay import density_overlay

            overlay = await asyncio.to_thread(lambda: _encode_png(density_overlay(image, density_map.host())))
            if output == "overlay":
                return _file_response(overlay, model, headers)
        response.headers.update({**_model_headers(model), **headers})
        height, width = density_map.shape
        # only the JSON answer carries the grid's cells: the other answers never sum them
        cells = await asyncio.to_thread(density_map.grid_counts, plan.tile)
        body = CountResponse(
            model=_model_ref(model),
            count=counted if finite else None,
            count_rounded=round(counted) if finite else None,
            width=width,
            height=height,
            tile=plan.tile,
            overlap=plan.overlap,
            tiles=[
                TileCount(row=c.row, col=c.col, box=c.box, count=c.count if math.isfinite(c.count) else None)
                for c in cells
            ],
        )
        if density == "array":
            body.density = DensityArray(
                stride=density_stride, **encode_array(sum_pool(density_map.host(), density_stride))
            )
        elif density == "overlay":
            body.overlay_png = data_url_png(overlay)
        return body


@router.post(
    "/segment",
    response_model=SegmentResponse,
    openapi_extra=IMAGE_BODY,
    responses=_responses(
        "output=png: 0/255 mask; output=overlay: mask over the image",
        {
            GEOTIFF_MEDIA_TYPE: "output=geotiff: uint8 0/1 mask, on the input's georeferencing",
            GEOJSON_MEDIA_TYPE: "output=geojson: FeatureCollection of building polygons in the input's CRS",
        },
    ),
    summary="Segment buildings in an aerial image",
)
async def segment(
    request: Request,
    response: Response,
    service: Annotated[Service, Depends(get_service)],
    output: Annotated[
        SegmentOutput,
        Query(
            description="json, png (mask), overlay, geotiff (0/1 mask on the input's georeferencing) or "
            "geojson (building polygons in the input's CRS)"
        ),
    ] = "json",
    tile: TileQuery = None,
    overlap: OverlapQuery = None,
    threshold: Annotated[float, Query(ge=0.0, le=1.0, description="building probability cut-off")] = 0.5,
    mask: Annotated[
        Literal["rle", "coco-rle", "png", "none"],
        Query(description="how the JSON carries the mask: row-major RLE, COCO RLE, PNG or not at all"),
    ] = "rle",
    overlay: Annotated[bool, Query(description="include the overlay PNG in the JSON")] = False,
    stretch_low: StretchLowQuery = 0.5,
    stretch_high: StretchHighQuery = 99.5,
) -> Any:
    geo = output in ("geotiff", "geojson")
    async with _admitted_image(request, service, "segmenter", stretch_low, stretch_high, geo) as (
        image,
        where,
    ):
        probability, plan, model = await service.predict("segmenter", image, tile, overlap)
        # ~1 ms for a 2048x2048 map on a CPU: off the event loop all the same, which serves every other
        # request meanwhile
        building, pixels = await asyncio.to_thread(probability.mask, threshold)
        fraction = pixels / building.size
        service.metrics.mask_fraction.observe(fraction)
        headers = {"X-Building-Fraction": f"{fraction:.6f}"}
        if output == "png":
            png = await asyncio.to_thread(lambda: _encode_png(building * np.uint8(255)))
            return _file_response(png, model, headers)
        if output == "geotiff":
            tiff = await asyncio.to_thread(write_geotiff, building, where, "building (1) or not (0)")
            return _file_response(tiff, model, headers, GEOTIFF_MEDIA_TYPE)
        if output == "geojson":
            geojson = await asyncio.to_thread(lambda: json.dumps(mask_polygons(building, where)).encode())
            return _file_response(geojson, model, headers, GEOJSON_MEDIA_TYPE)
        overlay_png: bytes | None = None
        if output == "overlay" or overlay:
            from fieldkube.vision.overlay import mask_overlay

            overlay_png = await asyncio.to_thread(lambda: _encode_png(mask_overlay(image, building)))
            if output == "overlay":
                return _file_response(overlay_png, model, headers)
        response.headers.update({**_model_headers(model), **headers})
        height, width = building.shape
        body = SegmentResponse(
            model=_model_ref(model),
            building_fraction=fraction,
            building_pixels=pixels,
            threshold=threshold,
            width=width,
            height=height,
            tile=plan.tile,
            overlap=plan.overlap,
        )
        if mask == "rle":
            body.mask_rle = MaskRle(**mask_to_rle(building))
        elif mask == "coco-rle":
            body.mask_coco_rle = MaskCocoRle(**await asyncio.to_thread(mask_to_coco_rle, building))
        elif mask == "png":
            body.mask_png = data_url_png(await asyncio.to_thread(_encode_png, building * np.uint8(255)))
        if overlay_png is not None:
            body.overlay_png = data_url_png(overlay_png)
        return body
