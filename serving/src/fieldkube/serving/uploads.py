"""Turn a request body into a decoded image, refusing oversized bodies (413), pixel bombs (413),
unsupported types (415) and corrupt or truncated files (400) with messages that say what was wrong.

An upload is streamed to a temporary file as it arrives (`receive_upload`), its header read for the
format and size (`read_header`: what admission by pixels needs), and only then decoded from the file
(`decode_image`), so neither a large body nor a burst of them is held in memory before a limit applies.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive

from fieldkube.serving.errors import ApiError

SUPPORTED = "JPEG, PNG or TIFF"
_WRITE_BYTES = 1 << 20
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


def _limited(request: Request, limit: int) -> Request:
    """`request` whose body is refused with 413: at once when its Content-Length says more than `limit`
    bytes, else as soon as more than that has arrived."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {int(length)} bytes; the limit is {limit} bytes")
    return Request(request.scope, receive=_limited_receive(request.receive, limit))


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body in memory (/v2 tensors), refused with 413 as soon as it passes `limit` bytes."""
    return b"".join([chunk async for chunk in _limited(request, limit).stream()])


@dataclass(frozen=True)
class Upload:
    """An uploaded image on disk (the raw body, or the multipart 'file' part), deleted after the request."""

    path: Path
    declared_type: str
    size: int


def _limited_receive(receive: Receive, limit: int) -> Receive:
    """`receive` that refuses the body with 413 once more than `limit` bytes have arrived."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        return message

    return limited


async def _write_stream(request: Request, handle: IO[bytes]) -> int:
    """Copy the body to `handle` off the event loop, ~1 MiB of chunks at a time; the byte count. The chunks
    are written as they arrived (one `writelines`), not joined into one buffer first: that would copy
    every byte of the upload once more on the event loop."""
    pending: list[bytes] = []
    size = pending_bytes = 0
    async for chunk in request.stream():
        pending.append(chunk)
        size += len(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= _WRITE_BYTES:
            await asyncio.to_thread(handle.writelines, pending)
            pending, pending_bytes = [], 0
    if pending:
        await asyncio.to_thread(handle.writelines, pending)
    return size


async def _write_multipart(request: Request, handle: IO[bytes]) -> tuple[int, str]:
    """Parse a multipart body as it arrives and copy its image part (field 'file') to `handle`."""
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ApiError:
        raise
    except Exception as error:
        raise ApiError(400, f"malformed multipart body: {error}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if not files:
                raise ApiError(400, "multipart body has no file: send the image in a form field named 'file'")
            upload = files[0]
        await asyncio.to_thread(shutil.copyfileobj, upload.file, handle, _WRITE_BYTES)
        return handle.tell(), (upload.content_type or "").lower()
    finally:
        await form.close()


@asynccontextmanager
async def receive_upload(request: Request, limit: int, directory: str | None = None) -> AsyncIterator[Upload]:
    """Stream the request's image to a temporary file as it arrives (a raw body or a multipart upload,
    field 'file'), never holding it whole in memory; 413 once it passes `limit` bytes. The file is removed
    when the block ends."""
    limited = _limited(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    with tempfile.NamedTemporaryFile(prefix="fieldkube-upload-", dir=directory) as handle:
        if content_type == "multipart/form-data":
            size, declared = await _write_multipart(limited, handle)
        else:
            size, declared = await _write_stream(limited, handle), content_type
        handle.flush()
        yield Upload(Path(handle.name), declared, size)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read before any pixel is decoded."""

    fmt: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(upload: Upload, max_pixels: int) -> ImageHeader:
    """Format and size of an uploaded image; raises ApiError 400/413/415 for every bad input."""
    from PIL.Image import DecompressionBombError as ImageBombError

    from fieldkube.vision.imageio import image_size

    if upload.size == 0:
        raise ApiError(400, f"request body is empty: expected a {SUPPORTED} image")
    with upload.path.open("rb") as handle:
        head = handle.read(16)
    fmt = sniff_format(head)
    if fmt is None:
        raise ApiError(
            415,
            f"unsupported image type ({_describe_unknown(head, upload.declared_type)}): expected {SUPPORTED}",
        )
    try:
        height, width = image_size(upload.path, name="uploaded image")
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
    return ImageHeader(fmt, width, height)


def decode_image(
    upload: Upload, header: ImageHeader, max_pixels: int, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """uint8 (H, W, 3) RGB, upright by its EXIF orientation, samples deeper than 8 bits stretched
    between `percentiles`; raises ApiError 400 for a file whose pixels cannot be decoded.
    """
    from fieldkube.vision.imageio import ImageError, read_image

    try:
        image = read_image(
            upload.path,
            name="uploaded image",
            max_pixels=max_pixels,
            percentiles=percentiles,
            exif_orientation=True,
        )
    except ImageError as error:
        raise ApiError(400, str(error)) from None
    except Exception as error:  # decoders raise many types for damaged files; all are the client's input
        raise ApiError(
            400, f"corrupt or truncated {header.fmt.upper()} image: {type(error).__name__}: {error}"
        ) from None
    return image
