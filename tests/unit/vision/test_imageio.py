"""Image reading: formats, conversions, windowed TIFF reads and clear errors naming the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from fieldkube.vision import imageio
from fieldkube.vision.imageio import ImageError, encode_png, read_image, read_tiff_window, write_png
from fieldkube.vision.tiling import Box


@pytest.fixture
def picture(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)


def test_png_and_tiff_round_trip_exactly(tmp_path: Path, picture: np.ndarray) -> None:
    write_png(tmp_path / "a.png", picture)
    tifffile.imwrite(tmp_path / "a.tif", picture, compression="zlib")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), picture)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), picture)
    np.testing.assert_array_equal(read_image(encode_png(picture)), picture)


@pytest.mark.parametrize("compression", ["lzw", "packbits", "zstd", "jpeg"])
def test_compressed_tiffs_as_gis_tools_write_them_are_read(
    tmp_path: Path, picture: np.ndarray, compression: str
) -> None:
    """LZW is GDAL's and QGIS's usual GeoTIFF compression; JPEG-in-TIFF is common for orthophotos."""
    if compression == "jpeg":  # lossy: a smooth picture, as photographs are, comes back close
        ramp = np.linspace(0, 255, 80)[None, :, None] * np.linspace(0.2, 1.0, 60)[:, None, None]
        picture = np.broadcast_to(ramp, (60, 80, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", picture, compression=compression, tile=(32, 32))
    read = read_image(tmp_path / "a.tif")
    window = read_tiff_window(tmp_path / "a.tif", Box(10, 20, 50, 70))
    if compression == "jpeg":
        assert read.shape == picture.shape and np.abs(read.astype(int) - picture).mean() < 3
        np.testing.assert_array_equal(window, read[10:50, 20:70])
    else:
        np.testing.assert_array_equal(read, picture)
        np.testing.assert_array_equal(window, picture[10:50, 20:70])


def test_jpeg_is_decoded_to_rgb(tmp_path: Path) -> None:
    ys, xs = np.mgrid[0:60, 0:80]
    smooth = np.stack([xs * 3, ys * 4, np.full_like(xs, 128)], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    decoded = read_image(tmp_path / "a.jpg")
    assert decoded.shape == (60, 80, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - smooth).mean() < 3


def test_grey_rgba_and_16_bit_images_become_rgb8(tmp_path: Path, picture: np.ndarray) -> None:
    Image.fromarray(picture[..., 0]).save(tmp_path / "grey.png")
    assert (read_image(tmp_path / "grey.png")[..., 2] == picture[..., 0]).all()
    rgba = np.dstack([picture, np.full(picture.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), picture)
    tifffile.imwrite(tmp_path / "deep.tif", picture.astype(np.uint16) * 257)
    assert picture.min() == 0 and picture.max() == 255  # so the full-range stretch is the identity
    np.testing.assert_array_equal(read_image(tmp_path / "deep.tif", percentiles=(0, 100)), picture)


@pytest.mark.parametrize("container", ["tiff", "png"])
def test_12_bit_imagery_is_stretched_by_percentiles_not_shifted_to_black(
    tmp_path: Path, picture: np.ndarray, container: str
) -> None:
    # 16-bit PNG through Pillow is greyscale (mode I;16); TIFF keeps three channels.
    expected = picture[..., :1] if container == "png" else picture
    deep = expected.astype(np.uint16) * 16 + 3  # 12-bit samples: 3 .. 4083
    path = tmp_path / f"deep.{container}"
    if container == "png":
        Image.fromarray(deep[..., 0]).save(path)
    else:
        tifffile.imwrite(path, deep)
    full = read_image(path, percentiles=(0, 100))
    np.testing.assert_array_equal(full[..., : expected.shape[2]], expected)
    stretched = read_image(path)[..., : expected.shape[2]].astype(int)  # default 0.5 / 99.5
    assert stretched.min() == 0 and stretched.max() == 255
    low, high = np.percentile(expected, [0.5, 99.5])
    inside = (expected > low + 1) & (expected < high - 1)
    want = (expected.astype(float) - low) * 255 / (high - low)
    assert np.abs(stretched[inside] - want[inside]).max() <= 2


def test_percentiles_are_checked_and_a_flat_deep_image_keeps_its_level(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "flat.tif", np.full((8, 8), 65535, np.uint16))
    assert (read_image(tmp_path / "flat.tif") == 255).all()
    with pytest.raises(ValueError, match="percentiles"):
        read_image(tmp_path / "flat.tif", percentiles=(50, 50))


def test_exif_orientation_is_applied_only_when_asked(picture: np.ndarray) -> None:
    image = Image.fromarray(picture)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the stored pixels must turn 90 degrees clockwise to stand upright
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)  # PNG (lossless) carries EXIF in its eXIf chunk
    data = buffer.getvalue()
    np.testing.assert_array_equal(read_image(data), picture)
    np.testing.assert_array_equal(read_image(data, exif_orientation=True), np.rot90(picture, k=-1))


@pytest.mark.parametrize("layout", ["plain", "tiled", "strips"])
def test_tiff_windows_match_the_full_image(tmp_path: Path, rng: np.random.Generator, layout: str) -> None:
    full = rng.integers(0, 256, size=(300, 340, 3), dtype=np.uint8)
    path = tmp_path / f"{layout}.tif"
    options = {"plain": {}, "tiled": {"tile": (64, 64), "compression": "zlib"}}.get(
        layout, {"rowsperstrip": 16, "compression": "zlib"}
    )
    tifffile.imwrite(path, full, **options)
    window = read_tiff_window(path, Box(70, 90, 230, 333))
    np.testing.assert_array_equal(window, full[70:230, 90:333])


def test_tiled_window_decodes_only_the_touched_tiles(tmp_path: Path, rng: np.random.Generator) -> None:
    full = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, full, tile=(64, 64), compression="zlib")
    # Corrupt a tile far from the window: a whole-image decode would fail, the window read must not.
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages.first.dataoffsets[15], tif.pages.first.databytecounts[15]
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = b"\x00" * size
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_tiff_window(path, Box(0, 0, 64, 128)), full[:64, :128])
    with pytest.raises(ImageError, match=r"big\.tif"):
        read_image(path)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        read_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageError, match=r"notes\.png: not a recognised image"):
        read_image(tmp_path / "notes.png")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match=r"upload\.png: corrupt or truncated"):
        read_image(buffer.getvalue()[:-40], name="upload.png")
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_every_8_bit_png_kind_decodes_as_pillow_does(tmp_path: Path, picture: np.ndarray, mode: str) -> None:
    image = Image.fromarray(picture).convert(mode)
    image.save(tmp_path / "a.png")
    expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), expected)
    np.testing.assert_array_equal(read_image((tmp_path / "a.png").read_bytes()), expected)


def test_plain_pngs_take_the_fast_decoder_and_the_rest_pillow(
    tmp_path: Path, picture: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grey, RGB and RGBA 8-bit PNGs never reach Pillow; palette PNGs and, when orientation is applied,
    PNGs with an EXIF block do."""

    def no_pillow(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow was asked to decode")

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", exif=exif)
    with_exif = buffer.getvalue()
    Image.fromarray(picture).convert("P").save(tmp_path / "palette.png")
    monkeypatch.setattr(Image, "open", no_pillow)
    rgba = np.dstack([picture, np.full(picture.shape[:2], 9, np.uint8)])
    for stored, expected in ((picture, picture), (rgba, picture), (picture[..., 1], picture[..., [1, 1, 1]])):
        np.testing.assert_array_equal(read_image(encode_png(stored)), expected)
    np.testing.assert_array_equal(read_image(with_exif), picture)  # orientation not asked: EXIF not read
    with pytest.raises(AssertionError, match="Pillow was asked"):
        read_image(tmp_path / "palette.png")
    with pytest.raises(AssertionError, match="Pillow was asked"):
        read_image(with_exif, exif_orientation=True)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG."""
    chunks, offset = [], 8
    while offset < len(png):
        length = int.from_bytes(png[offset : offset + 4], "big")
        chunks.append((png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def _no_pillow(*args: object, **kwargs: object) -> None:
    raise AssertionError("Pillow was asked to decode")


def test_an_exif_chunk_after_the_pixels_is_found_and_applied(picture: np.ndarray, png_from_chunks) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", exif=exif)
    chunks = _chunks(buffer.getvalue())
    exif_chunk = next(c for c in chunks if c[0] == b"eXIf")
    rest = [c for c in chunks if c[0] != b"eXIf"]
    late = png_from_chunks([*rest[:-1], exif_chunk, rest[-1]])  # eXIf between the last IDAT and IEND
    assert [kind for kind, _ in _chunks(late)][-2:] == [b"eXIf", b"IEND"]
    np.testing.assert_array_equal(read_image(late, exif_orientation=True), np.rot90(picture, k=-1))


def test_exif_named_in_a_text_chunk_keeps_the_fast_decoder(
    picture: np.ndarray, monkeypatch: pytest.MonkeyPatch, png_from_chunks
) -> None:
    """Only an eXIf chunk sends a PNG to Pillow, not the four bytes elsewhere in the file."""
    chunks = _chunks(encode_png(picture))
    text = (b"tEXt", b"Comment\x00no eXIf here")
    data = png_from_chunks([chunks[0], text, *chunks[1:]])
    assert b"eXIf" in data
    monkeypatch.setattr(Image, "open", _no_pillow)
    np.testing.assert_array_equal(read_image(data, exif_orientation=True), picture)


def test_a_png_chunk_past_the_end_of_the_file_is_a_clear_error(picture: np.ndarray) -> None:
    data = encode_png(picture)
    with pytest.raises(ImageError, match=r"upload: corrupt or truncated image \(.*runs past the end"):
        read_image(data[: len(data) // 2], name="upload", exif_orientation=True)


def test_a_png_of_more_chunks_than_are_walked_goes_to_pillow(
    picture: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encode_png(picture)
    read_image(data, exif_orientation=True)  # under the cap: the fast decoder, Pillow not needed
    monkeypatch.setattr(imageio, "_PNG_MAX_CHUNKS", 2)
    monkeypatch.setattr(Image, "open", _no_pillow)
    with pytest.raises(AssertionError, match="Pillow was asked"):
        read_image(data, exif_orientation=True)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    write_png(tmp_path / "big.png", np.zeros((200, 300, 3), np.uint8))
    with pytest.raises(ImageError, match=r"big\.png: 300x200 = 60000 pixels exceeds the limit of 10000"):
        read_image(tmp_path / "big.png", max_pixels=10_000)


def test_window_outside_the_image_is_rejected(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ImageError, match=r"a\.tif: window .* is not inside the 10x10 image"):
        read_tiff_window(tmp_path / "a.tif", Box(0, 0, 20, 5))
