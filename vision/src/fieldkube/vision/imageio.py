"""Read field and aerial images (JPEG/PNG/TIFF) as uint8 RGB with clear errors, and large TIFFs by window.

Every error is an `ImageError` naming the file and what was expected. Decoding is refused above a pixel
limit before any pixel is decoded. Samples deeper than 8 bits (12-bit data in 16-bit PNG/TIFF, 16-bit
data) are stretched linearly between two percentiles of the image (default 0.5 and 99.5), because
shifting them down by the container's width leaves 12-bit imagery near black. `read_tiff_window` reads
a window of a large (Geo)TIFF by memory-mapping uncompressed data or decoding only the strips/tiles the
window touches.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageOps, UnidentifiedImageError

from fieldkube.vision.tiling import Box

MAX_PIXELS = 100_000_000
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Where deep (more than 8-bit) samples are cut: below the low percentile is 0, above the high one 255."""
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SPNG_COLOUR_TYPES = (0, 2, 6)
"""PNG colour types libspng decodes here: grey, RGB, RGBA (palette and grey+alpha go through Pillow)."""

Source = str | os.PathLike[str] | bytes


class ImageError(ValueError):
    """An image that cannot be read: missing, corrupt, unsupported or too large."""


def _name(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "<image bytes>" if isinstance(source, bytes) else str(source)


def _head(source: Source, label: str) -> bytes:
    if isinstance(source, bytes):
        return source[:4]
    try:
        with Path(source).open("rb") as handle:
            return handle.read(4)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, expected an image file") from None
    except OSError as error:
        raise ImageError(f"{label}: cannot be read ({error.strerror or error})") from None


def _check_pixels(label: str, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {height * width} pixels exceeds the limit of {max_pixels}; "
            "tile it or read a window"
        )
    if height == 0 or width == 0:
        raise ImageError(f"{label}: empty image ({width}x{height})")


def _percentile_values(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The two percentiles of all samples; uint16 through a histogram (linear time, no sorted copy)."""
    low_q, high_q = percentiles
    if array.dtype == np.uint16:
        cdf = np.cumsum(np.bincount(array.ravel(), minlength=1 << 16))
        total = int(cdf[-1])
        low = int(np.searchsorted(cdf, low_q / 100 * total, side="right"))
        high = int(np.searchsorted(cdf, high_q / 100 * total, side="left"))
        return float(min(low, (1 << 16) - 1)), float(min(high, (1 << 16) - 1))
    low_v, high_v = np.percentile(array, [low_q, high_q])
    return float(low_v), float(high_v)


def stretch_to_uint8(array: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Deep integer samples to uint8: linear from the low percentile (0) to the high one (255), clipped.

    All channels share one stretch, so colours keep their balance. A flat image (both percentiles
    equal) is scaled by its type's full range instead.
    """
    low_q, high_q = percentiles
    if not 0.0 <= low_q < high_q <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_q}, {high_q}")
    low, high = _percentile_values(array, percentiles)
    if high <= low:
        low, high = 0.0, float(np.iinfo(array.dtype).max)
    if array.dtype == np.uint16:  # a lookup table: one uint8 per possible value, no float copy
        levels = np.arange(1 << 16, dtype=np.float64)
        table = np.clip((levels - low) * (255.0 / (high - low)), 0, 255).round().astype(np.uint8)
        lut_out: np.ndarray = table[array]
        return lut_out
    scaled = (array.astype(np.float64) - low) * (255.0 / (high - low))
    out: np.ndarray = np.clip(scaled, 0, 255).round().astype(np.uint8)
    return out


def to_rgb8(
    array: np.ndarray, label: str = "image", percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> np.ndarray:
    """Convert a decoded (H, W), (H, W, 1|2|3|4) array of any integer/float dtype to uint8 (H, W, 3).

    Integer samples deeper than 8 bits are stretched between `percentiles` (see `stretch_to_uint8`).
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{label}: expected a 2-D grey or RGB(A) image, got array shape {array.shape}")
    if array.shape[2] in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if np.iinfo(array.dtype).bits <= 8:
            return np.clip(array, 0, 255).astype(np.uint8)
        return stretch_to_uint8(array, percentiles)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    raise ImageError(f"{label}: unsupported pixel type {array.dtype}")


def _read_tiff(source: Source, label: str, max_pixels: int, percentiles: tuple[float, float]) -> np.ndarray:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with tifffile.TiffFile(handle) as tif:
            page = tif.pages.first
            height, width = int(page.imagelength), int(page.imagewidth)
            _check_pixels(label, height, width, max_pixels)
            array = page.asarray()
            if page.planarconfig == 2 and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"{label}: not a readable TIFF ({type(error).__name__}: {error})") from None
    return to_rgb8(array, label, percentiles)


_PNG_MAX_CHUNKS = 65_536
"""Chunk headers `_png_has_exif` reads before it leaves the file to Pillow (a PNG of 8 KiB IDAT chunks
reaches it at 512 MiB; the walk costs a few microseconds per chunk)."""


def _png_has_exif(data: bytes, label: str) -> bool:
    """Whether a PNG holds an eXIf chunk, found from its chunk headers wherever it lies (before or after
    the pixels), not by searching every byte of the file: 4 ms per 7 MB, and a chance match inside the
    compressed pixels sent the file to the slower decoder. Past `_PNG_MAX_CHUNKS` chunks: True (Pillow
    reads it). A chunk that runs past the end of the file is an error."""
    offset = len(_PNG_SIGNATURE)
    for _ in range(_PNG_MAX_CHUNKS):
        if offset + 8 > len(data):
            return False
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        offset += 12 + length  # length, type, data, CRC
        if offset > len(data):
            raise ImageError(
                f"{label}: corrupt or truncated image (PNG chunk {kind!r} runs past the end of the file)"
            )
    return True


def _read_png_spng(source: Source, label: str, max_pixels: int, exif_orientation: bool) -> np.ndarray | None:
    """A plain 8-bit PNG decoded by libspng (through imagecodecs), or None where Pillow must read it.

    libspng takes half of Pillow's time, and imagecodecs releases the GIL while it decodes, so the
    service's concurrent uploads decode on as many cores as the host has (another libspng binding,
    pyspng, holds it: two threads decoded no faster than one). Pillow is kept for palette and grey+alpha
    images, deeper samples (stretched by percentiles) and, when the orientation is applied, a PNG with
    an eXIf chunk."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    # signature (8), IHDR length (4) and type (4), width, height (4 each), bit depth, colour type, ...
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    if depth != 8 or colour not in _SPNG_COLOUR_TYPES or (exif_orientation and _png_has_exif(data, label)):
        return None
    _check_pixels(label, height, width, max_pixels)
    try:
        pixels: np.ndarray = imagecodecs.spng_decode(data)
    except imagecodecs.SpngError as error:
        raise ImageError(f"{label}: corrupt or truncated image ({error})") from None
    if pixels.ndim == 2:  # grey: the three channels Pillow's convert("RGB") gives
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape[2] == 4:  # RGBA: the colour, as Pillow's convert("RGB") keeps it
        return np.ascontiguousarray(pixels[:, :, :3])
    return pixels


def _read_pil(
    source: Source, label: str, max_pixels: int, percentiles: tuple[float, float], exif_orientation: bool
) -> np.ndarray:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                _check_pixels(label, height, width, max_pixels)
                if image.format not in {"JPEG", "PNG", "BMP", "WEBP", "MPO"}:
                    raise ImageError(
                        f"{label}: unsupported format {image.format}; expected JPEG, PNG or TIFF"
                    )
                image.load()
                if exif_orientation:  # in place: no copy of the pixels when the picture is upright already
                    ImageOps.exif_transpose(image, in_place=True)
                if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    return to_rgb8(np.asarray(image), label, percentiles)
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                pixels = np.asarray(rgb)  # a read-only view of a bytes copy of Pillow's pixels
                if rgb is not image:
                    rgb.close()
            # Pillow's own buffer is freed by now: the writable copy does not add a third image to the peak
            return pixels.copy()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ImageError(f"{label}: not a recognised image (expected JPEG, PNG or TIFF): {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{label}: corrupt or truncated image ({error})") from None


def read_image(
    source: Source,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    exif_orientation: bool = False,
) -> np.ndarray:
    """Decode a JPEG/PNG/TIFF file path or bytes into uint8 RGB (H, W, 3).

    Grey, 16-bit and RGBA inputs are converted (alpha dropped); samples deeper than 8 bits are stretched
    between `percentiles` of the image. `exif_orientation` turns JPEG/PNG pixels upright by their EXIF
    Orientation tag: the service does, for photos straight from a camera or phone; dataset preparation
    does not, because annotations (points, masks) are drawn on the stored pixels. `name` labels bytes
    in error messages.
    """
    label = _name(source, name)
    head = _head(source, label)
    if len(head) == 0:
        raise ImageError(f"{label}: empty file, expected a JPEG, PNG or TIFF image")
    if head in _TIFF_MAGIC:
        return _read_tiff(source, label, max_pixels, percentiles)
    if head == _PNG_SIGNATURE[:4]:
        fast = _read_png_spng(source, label, max_pixels, exif_orientation)
        if fast is not None:
            return fast
    return _read_pil(source, label, max_pixels, percentiles, exif_orientation)


def image_size(path: str | os.PathLike[str], name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image file without decoding its pixels; `name` labels it in errors.

    Pillow's decompression-bomb warning is silenced: callers compare the size with their own limit.
    Headers past twice Pillow's limit still raise `PIL.Image.DecompressionBombError`."""
    label = str(path) if name is None else name
    if _head(path, label) in _TIFF_MAGIC:
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        except Exception as error:
            raise ImageError(f"{label}: not a readable TIFF ({error})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError(f"{label}: not a recognised image ({error})") from None


def _segment_window(tif: tifffile.TiffFile, box: Box, label: str) -> np.ndarray:
    """Decode only the strips or tiles of page 0 that intersect `box`; returns the raw window array."""
    page = tif.pages.first
    assert isinstance(page, tifffile.TiffPage)
    if page.planarconfig == 2 and page.samplesperpixel > 1:
        raise ImageError(f"{label}: planar (separate-plane) TIFFs are read whole, not by window")
    y0, x0, y1, x1 = box
    samples = page.samplesperpixel
    if page.is_tiled:
        tile_h, tile_w = int(page.tilelength), int(page.tilewidth)
        tiles_x = -(-int(page.imagewidth) // tile_w)
        indices = [
            ty * tiles_x + tx
            for ty in range(y0 // tile_h, (y1 - 1) // tile_h + 1)
            for tx in range(x0 // tile_w, (x1 - 1) // tile_w + 1)
        ]
    else:
        rows = int(page.rowsperstrip)
        indices = list(range(y0 // rows, (y1 - 1) // rows + 1))
    window = np.zeros((y1 - y0, x1 - x0, samples), dtype=page.dtype)
    decode = page.decode
    handle = tif.filehandle
    extra: dict[str, object] = {"_fullsize": page.is_tiled}
    if page.compression in {6, 7, 34892, 33007}:
        extra.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
    for index in indices:
        handle.seek(page.dataoffsets[index])
        data = handle.read(page.databytecounts[index])
        segment, position, _shape = decode(data, index, **extra)
        if segment is None:
            continue
        seg = np.asarray(segment).reshape(segment.shape[-3], segment.shape[-2], -1)
        sy, sx = int(position[2]), int(position[3])
        ty0, tx0 = max(y0, sy), max(x0, sx)
        ty1, tx1 = min(y1, sy + seg.shape[0]), min(x1, sx + seg.shape[1])
        if ty0 < ty1 and tx0 < tx1:
            window[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = seg[ty0 - sy : ty1 - sy, tx0 - sx : tx1 - sx]
    return window


def read_tiff_window(path: str | os.PathLike[str], box: Box, *, raw: bool = False) -> np.ndarray:
    """Read the window `box` = (y0, x0, y1, x1) of page 0 of a TIFF without decoding the whole image.

    Uncompressed contiguous data is memory-mapped; compressed images decode only the strips or tiles the
    window touches. Returns uint8 RGB (h, w, 3), or with `raw=True` the stored samples (h, w, samples),
    e.g. for single-channel masks. Deep samples are stretched by the window's own percentiles.
    """
    label = str(path)
    _head(path, label)
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            height, width = int(page.imagelength), int(page.imagewidth)
            y0, x0, y1, x1 = box
            if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
                raise ImageError(f"{label}: window {tuple(box)} is not inside the {width}x{height} image")
            if page.is_memmappable:
                mapped = tifffile.memmap(path, page=0, mode="r")
                window = np.array(mapped[y0:y1, x0:x1])
                del mapped
            else:
                window = _segment_window(tif, Box(y0, x0, y1, x1), label)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(
            f"{label}: cannot read window {tuple(box)} ({type(error).__name__}: {error})"
        ) from None
    if window.ndim == 2:
        window = window[..., None]
    return window if raw else to_rgb8(window, label)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 3) or (H, W, 4) array."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"encode_png expects a uint8 (H, W[, C]) array, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a PNG atomically (temporary file in the same directory, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_bytes(encode_png(array))
    temporary.replace(target)
