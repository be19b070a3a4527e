"""Turn a request body into a decoded image, refusing oversized bodies (413), pixel bombs (413),
unsupported types (415) and corrupt or truncated files (400) with messages that say what was wrong.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from fieldkube.serving.errors import ApiError

SUPPORTED = "JPEG, PNG or TIFF"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
)
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP/RIFF"),
    (b"%PDF", "PDF"),
    (b"{", "JSON"),
)


def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png' or 'tiff' from the file's first bytes; None for anything else."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _describe_unknown(data: bytes, declared: str) -> str:
    for magic, name in _KNOWN_OTHERS:
        if data.startswith(magic):
            return f"{name} data"
    return f"content type {declared!r}" if declared else "data that is not an image"


async def read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {int(length)} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _replay(body: bytes) -> object:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def read_image_bytes(request: Request, limit: int) -> tuple[bytes, str]:
    """The image bytes and declared content type from a raw body or a multipart upload (field 'file')."""
    body = await read_limited(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        return body, content_type
    replay = Request(request.scope, receive=_replay(body))  # type: ignore[arg-type]
    try:
        form = await replay.form(max_files=1, max_fields=8)
    except Exception as error:
        raise ApiError(400, f"malformed multipart body: {error}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if not files:
                raise ApiError(400, "multipart body has no file: send the image in a form field named 'file'")
            upload = files[0]
        data = await upload.read()
        return data, (upload.content_type or "").lower()
    finally:
        await form.close()


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    if fmt == "tiff":
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            return int(page.imagewidth), int(page.imagelength)
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is applied next
        with Image.open(io.BytesIO(data)) as img:
            return int(img.width), int(img.height)


def decode_image(
    data: bytes, declared_type: str, max_pixels: int, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """uint8 (H, W, 3) RGB, upright by its EXIF orientation, samples deeper than 8 bits stretched
    between `percentiles`; raises ApiError 400/413/415 for every bad input.
    """
    from PIL.Image import DecompressionBombError as ImageBombError

    from fieldkube.vision.imageio import ImageError, read_image

    if not data:
        raise ApiError(400, f"request body is empty: expected a {SUPPORTED} image")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415, f"unsupported image type ({_describe_unknown(data, declared_type)}): expected {SUPPORTED}"
        )
    try:
        width, height = image_size(data, fmt)
    except ImageBombError as error:  # Pillow refuses headers past twice its own limit before we see them
        raise ApiError(413, f"image is too large ({error}); the limit is {max_pixels} pixels") from None
    except Exception as error:
        raise ApiError(
            400, f"corrupt or truncated {fmt.upper()} image: cannot read its header ({error})"
        ) from None
    if width * height > max_pixels:
        raise ApiError(
            413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    if width == 0 or height == 0:
        raise ApiError(400, f"{fmt.upper()} image has no pixels ({width}x{height})")
    try:
        image = read_image(
            data, name="uploaded image", max_pixels=max_pixels, percentiles=percentiles, exif_orientation=True
        )
    except ImageError as error:
        raise ApiError(400, str(error)) from None
    except Exception as error:  # decoders raise many types for damaged files; all are the client's input
        raise ApiError(
            400, f"corrupt or truncated {fmt.upper()} image: {type(error).__name__}: {error}"
        ) from None
    return image
