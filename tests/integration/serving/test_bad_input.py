"""Bad input never crashes the server: size/pixel limits 413, unsupported 415, corrupt 400, load 429/503."""

from __future__ import annotations

import io
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image


def _post(url: str, data: bytes, content_type: str = "application/octet-stream") -> requests.Response:
    return requests.post(f"{url}/v1/count", data=data, headers={"Content-Type": content_type}, timeout=60)


def test_body_over_the_size_limit_is_413(start_server, bundles) -> None:
    server = start_server(counter=str(bundles.counter), max_upload_bytes=4096)
    response = _post(server.url, b"\xff\xd8\xff" + b"\x00" * 5000, "image/jpeg")
    assert response.status_code == 413
    assert "limit is 4096 bytes" in response.json()["error"]


def _png_header_only(png_from_chunks, width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with no pixel data at all."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return png_from_chunks([(b"IHDR", header), (b"IEND", b"")])


def test_decompression_bomb_is_refused_before_decoding(server) -> None:
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, format="PNG")  # ~64 MP that compresses to a few KB
    response = _post(server.url, buffer.getvalue(), "image/png")
    assert response.status_code == 413
    assert "8000x8000 = 64000000 pixels" in response.json()["error"]


def test_header_past_the_decoders_own_bomb_guard_is_413_too(server, png_from_chunks) -> None:
    response = _post(server.url, _png_header_only(png_from_chunks, 30000, 30000), "image/png")
    assert response.status_code == 413, response.text
    assert "the limit is 26000000 pixels" in response.json()["error"]


@pytest.mark.parametrize(
    ("data", "content_type", "fragment"),
    [
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif", "GIF data"),
        (b"hello", "text/plain", "content type 'text/plain'"),
    ],
)
def test_unsupported_type_is_415(server, data: bytes, content_type: str, fragment: str) -> None:
    response = _post(server.url, data, content_type)
    assert response.status_code == 415
    detail = response.json()["error"]
    assert fragment in detail and "expected JPEG, PNG or TIFF" in detail


def test_truncated_images_are_400_with_a_clear_message(server, images) -> None:
    image = images.field(1, 64, 64, 3)
    for name, data in (
        ("JPEG", images.jpeg(image)),
        ("PNG", images.png(image)),
        ("TIFF", images.tiff(image)),
    ):
        response = _post(server.url, data[: len(data) // 2])
        assert response.status_code == 400, (name, response.text)
        detail = response.json()["error"]
        assert any(words in detail for words in ("corrupt or truncated", "not a readable", "cannot read")), (
            detail
        )


def test_empty_body_is_400(server) -> None:
    response = _post(server.url, b"")
    assert response.status_code == 400
    assert "empty" in response.json()["error"]


def test_bad_query_parameter_names_it(server, images) -> None:
    data = images.png(images.field(2, 64, 64, 2))
    response = requests.post(f"{server.url}/v1/count?tile=8", data=data, timeout=60)
    assert response.status_code == 422
    assert "query parameter 'tile'" in response.json()["error"]
    response = requests.post(f"{server.url}/v1/count?tile=64&overlap=40", data=data, timeout=60)
    assert response.status_code == 400
    assert "overlap must be between 0 and tile/2 = 32" in response.json()["error"]


def test_multipart_without_a_file_is_400(server) -> None:
    response = requests.post(f"{server.url}/v1/count", files={"other": (None, "x")}, timeout=60)
    assert response.status_code == 400
    assert "form field named 'file'" in response.json()["error"]


def test_corrupted_image_bytes_never_cause_a_server_error(server, images) -> None:
    """Bounded fuzz: random byte flips, truncations and splices of valid JPEG, PNG and TIFF files."""
    rng = np.random.default_rng(7)
    image = images.field(3, 48, 56, 3)
    originals = [images.jpeg(image), images.png(image), images.tiff(image)]
    statuses: set[int] = set()
    for index in range(90):
        data = bytearray(originals[index % 3])
        kind = index % 3
        if kind == 0:
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
                data[position] = int(rng.integers(0, 256))
        elif kind == 1:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            start = int(rng.integers(8, len(data)))
            data[start:] = rng.integers(0, 256, size=len(data) - start, dtype=np.uint8).tobytes()
        for endpoint in ("count", "segment"):
            response = requests.post(f"{server.url}/v1/{endpoint}", data=bytes(data), timeout=60)
            statuses.add(response.status_code)
            assert response.status_code in {200, 400, 413, 415}, response.text
            if response.status_code != 200:
                assert response.json()["error"]
    assert 400 in statuses
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def _queued_tiles(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('fieldkube_serve_queued_tiles{task="counter"}'):
            return float(line.split()[-1])
    return 0.0


def test_full_queue_answers_429_with_retry_after(start_server, bundles, images) -> None:
    """While one image's 3 tiles wait for a batch (long batch delay), a 5-tile image does not fit in 6."""
    server = start_server(
        counter=str(bundles.counter), max_queue_tiles=6, max_batch_size=64, max_batch_delay_s=8.0
    )
    three_tiles = images.png(images.field(4, 64, 128, 3))  # tile 64, overlap 32
    five_tiles = images.png(images.field(5, 64, 192, 5))
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(requests.post, f"{server.url}/v1/count", data=three_tiles, timeout=60)
        deadline = time.monotonic() + 8
        while _queued_tiles(server.url) < 3:
            assert time.monotonic() < deadline, "the first image never reached the queue"
            time.sleep(0.02)
        response = requests.post(f"{server.url}/v1/count", data=five_tiles, timeout=60)
        assert first.result().status_code == 200
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert "queue is full (3 tiles waiting, this image needs 5, limit 6)" in response.json()["error"]


def test_image_needing_more_tiles_than_the_queue_holds_is_400(start_server, bundles, images) -> None:
    """Retrying could never help, so this is not a 429: the message says to use a larger tile."""
    server = start_server(counter=str(bundles.counter), max_queue_tiles=6)
    response = requests.post(
        f"{server.url}/v1/count", data=images.png(images.field(6, 64, 256, 5)), timeout=60
    )
    assert response.status_code == 400
    assert "into 7 tiles; the limit is 6: use a larger tile" in response.json()["error"]


def test_request_timeout_answers_503_with_retry_after(start_server, bundles, images) -> None:
    server = start_server(counter=str(bundles.counter), request_timeout_s=0.001, max_batch_size=1)
    response = requests.post(
        f"{server.url}/v1/count", data=images.png(images.field(5, 256, 256, 5)), timeout=60
    )
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'fieldkube_serve_rejected_requests_total{reason="timeout",task="counter"} 1.0' in metrics


def test_unconfigured_task_is_503_with_a_reason(start_server, bundles, images) -> None:
    server = start_server(counter=str(bundles.counter))
    response = requests.post(
        f"{server.url}/v1/segment", data=images.png(images.aerial(1, 64, 64)), timeout=60
    )
    assert response.status_code == 503
    assert "Retry-After" not in response.headers  # configuration, not load: retrying cannot help
    assert "no segmenter model is configured" in response.json()["error"]
