"""Field formats on /v1: EXIF-rotated photos are served upright, 12/16-bit imagery is stretched to 8 bits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image


def _rotated_jpeg(upright: np.ndarray) -> bytes:
    """The upright picture stored as a camera held sideways does: pixels turned, EXIF Orientation 6."""
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # Orientation 6 turns these 90° clockwise back
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_exif_rotated_jpeg_is_counted_and_segmented_upright(server, images) -> None:
    field = images.field(11, 96, 160, 10)
    upright = requests.post(f"{server.url}/v1/count", data=images.jpeg(field, quality=95), timeout=60).json()
    rotated = requests.post(f"{server.url}/v1/count", data=_rotated_jpeg(field), timeout=60).json()
    assert (rotated["width"], rotated["height"]) == (160, 96)  # not the stored 96x160
    assert rotated["count"] == pytest.approx(upright["count"], rel=0.02)

    aerial = images.aerial(12, 96, 160)
    query = "mask=none&threshold=0.1"
    want = requests.post(f"{server.url}/v1/segment?{query}", data=images.jpeg(aerial, quality=95), timeout=60)
    got = requests.post(f"{server.url}/v1/segment?{query}", data=_rotated_jpeg(aerial), timeout=60)
    assert (got.json()["width"], got.json()["height"]) == (160, 96)
    assert got.json()["building_fraction"] == pytest.approx(want.json()["building_fraction"], abs=0.02)


def test_12_bit_tiff_counts_like_its_8_bit_original(server, images) -> None:
    field = images.field(13, 120, 150, 12)
    assert field.min() == 0 and field.max() == 255  # so a 0..100 percentile stretch restores it exactly
    twelve_bit = io.BytesIO()
    tifffile.imwrite(twelve_bit, field.astype(np.uint16) * 16)  # 0 .. 4080: near black if shifted by 8
    eight_bit = requests.post(f"{server.url}/v1/count", data=images.png(field), timeout=60).json()["count"]
    exact = requests.post(
        f"{server.url}/v1/count?stretch_low=0&stretch_high=100", data=twelve_bit.getvalue(), timeout=60
    )
    assert exact.status_code == 200, exact.text
    assert exact.json()["count"] == pytest.approx(eight_bit, rel=1e-6)
    default = requests.post(f"{server.url}/v1/count", data=twelve_bit.getvalue(), timeout=60).json()["count"]
    near_black = requests.post(
        f"{server.url}/v1/count", data=images.png((field // 16).astype(np.uint8)), timeout=60
    ).json()["count"]
    assert abs(default - eight_bit) < abs(near_black - eight_bit)


def test_stretch_percentiles_out_of_order_are_refused_naming_both(server, images) -> None:
    response = requests.post(
        f"{server.url}/v1/count?stretch_low=90&stretch_high=10", data=images.png(images.field(1, 64, 64, 1))
    )
    assert response.status_code == 422
    message = response.json()["error"]
    assert "stretch_low" in message and "stretch_high" in message
