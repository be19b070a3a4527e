"""POST /v1/count and /v1/segment on a real server with tiny trained models and real encoded images."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import requests
from PIL import Image

from fieldkube.serving.encodings import decode_array, rle_to_mask


def _png_image(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def _data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return _png_image(base64.b64decode(url.split(",", 1)[1]))


def test_count_json_names_the_model_and_its_tiles_sum_to_the_count(server, images) -> None:
    image = images.field(1, 150, 200, 12)
    response = requests.post(
        f"{server.url}/v1/count", data=images.png(image), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "counter-mcnn"
    assert body["model"]["version"].startswith("local-")
    assert response.headers["X-Model-Version"] == body["model"]["version"]
    assert (body["width"], body["height"], body["tile"]) == (200, 150, 64)
    assert body["count"] > 0
    assert body["count_rounded"] == round(body["count"])
    assert len(body["tiles"]) == 3 * 4
    assert sum(t["count"] for t in body["tiles"]) == pytest.approx(body["count"], rel=1e-5)
    assert body["density"] is None


def test_count_multipart_jpeg_and_density_array_keeps_the_count(server, images) -> None:
    image = images.field(2, 128, 160, 8)
    response = requests.post(
        f"{server.url}/v1/count",
        params={"density": "array", "density_stride": 4, "tile": 96, "overlap": 16},
        files={"file": ("field.jpg", images.jpeg(image), "image/jpeg")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["tile"], body["overlap"]) == (96, 16)
    density = decode_array(body["density"])
    assert density.shape == (32, 40)
    assert float(density.sum()) == pytest.approx(body["count"], rel=2e-3)


def test_count_png_output_is_a_heat_map_with_the_count_in_headers(server, images) -> None:
    image = images.field(3, 100, 120, 5)
    response = requests.post(f"{server.url}/v1/count?output=png", data=images.png(image), timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert float(response.headers["X-Count"]) > 0
    assert response.headers["X-Model-Name"] == "counter-mcnn"
    heat = _png_image(response.content)
    assert heat.shape == (100, 120, 3)
    assert heat.max() > 0


def test_count_overlay_is_the_image_size_and_differs_from_the_image(server, images) -> None:
    image = images.field(4, 90, 110, 6)
    response = requests.post(f"{server.url}/v1/count?output=overlay", data=images.png(image), timeout=60)
    assert response.status_code == 200, response.text
    overlay = _png_image(response.content)[..., :3]
    assert overlay.shape == (90, 110, 3)
    assert not np.array_equal(overlay, image)
    as_json = requests.post(
        f"{server.url}/v1/count?density=overlay", data=images.png(image), timeout=60
    ).json()
    assert _data_url_image(as_json["overlay_png"]).shape[:2] == (90, 110)


def test_count_accepts_tiff(server, images) -> None:
    image = images.field(5, 70, 80, 4)
    response = requests.post(
        f"{server.url}/v1/count", data=images.tiff(image), headers={"Content-Type": "image/tiff"}, timeout=60
    )
    assert response.status_code == 200, response.text
    png_count = requests.post(f"{server.url}/v1/count", data=images.png(image), timeout=60).json()["count"]
    assert response.json()["count"] == pytest.approx(png_count, rel=1e-6)


def test_segment_json_fraction_matches_its_rle_mask(server, images) -> None:
    image = images.aerial(1, 160, 140)
    response = requests.post(f"{server.url}/v1/segment", data=images.png(image), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "segmenter-unet"
    mask = rle_to_mask(body["mask_rle"])
    assert mask.shape == (160, 140)
    assert int(mask.sum()) == body["building_pixels"]
    assert body["building_fraction"] == pytest.approx(mask.mean())
    assert 0.0 <= body["building_fraction"] <= 1.0


def test_segment_coco_rle_decodes_with_pycocotools_to_the_served_mask(server, images) -> None:
    from pycocotools import mask as coco_mask

    data = images.png(images.aerial(4, 120, 90))  # not square: a row-major RLE would decode scrambled
    query = "threshold=0.1"  # the tiny test model's probabilities are low: this gives both classes
    served = _png_image(
        requests.post(f"{server.url}/v1/segment?output=png&{query}", data=data, timeout=60).content
    )
    body = requests.post(f"{server.url}/v1/segment?mask=coco-rle&{query}", data=data, timeout=60).json()
    assert body["mask_rle"] is None
    assert body["mask_coco_rle"]["size"] == [120, 90]
    decoded = coco_mask.decode(body["mask_coco_rle"])
    assert 0 < int(decoded.sum()) < decoded.size  # both classes present, so the order matters
    np.testing.assert_array_equal(decoded * 255, served)
    assert int(coco_mask.area(body["mask_coco_rle"])) == body["building_pixels"]


def test_segment_threshold_moves_the_fraction(server, images) -> None:
    data = images.png(images.aerial(2, 96, 96))
    everything = requests.post(f"{server.url}/v1/segment?threshold=0&mask=none", data=data, timeout=60).json()
    nothing = requests.post(f"{server.url}/v1/segment?threshold=1&mask=none", data=data, timeout=60).json()
    assert everything["building_fraction"] == 1.0
    assert nothing["building_fraction"] < everything["building_fraction"]
    assert everything["mask_rle"] is None


def test_segment_png_mask_and_overlay(server, images) -> None:
    image = images.aerial(3, 100, 90)
    data = images.png(image)
    mask_response = requests.post(f"{server.url}/v1/segment?output=png", data=data, timeout=60)
    assert mask_response.status_code == 200
    mask = _png_image(mask_response.content)
    assert mask.shape == (100, 90)
    assert set(np.unique(mask)) <= {0, 255}
    assert float(mask_response.headers["X-Building-Fraction"]) == pytest.approx(
        (mask == 255).mean(), abs=1e-6
    )
    body = requests.post(f"{server.url}/v1/segment?overlay=true&mask=png", data=data, timeout=60).json()
    np.testing.assert_array_equal(_data_url_image(body["mask_png"]), mask)
    assert _data_url_image(body["overlay_png"]).shape[:2] == (100, 90)
    overlay = requests.post(f"{server.url}/v1/segment?output=overlay", data=data, timeout=60)
    assert overlay.headers["content-type"] == "image/png"


def test_metrics_record_requests_batches_and_drift_signals(server, images) -> None:
    requests.post(f"{server.url}/v1/count", data=images.png(images.field(6, 64, 64, 3)), timeout=60)
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert (
        'fieldkube_serve_request_duration_seconds_count{endpoint="/v1/count",method="POST",status="200"}'
        in text
    )
    assert 'fieldkube_serve_batch_size_count{task="counter"}' in text
    assert 'fieldkube_serve_queue_wait_seconds_count{task="counter"}' in text
    assert 'fieldkube_serve_batch_inference_seconds_count{task="counter"}' in text
    forward_cpu = re.search(
        r'^fieldkube_serve_forward_cpu_seconds_total\{task="counter"\} (\S+)$', text, re.M
    )
    assert forward_cpu is not None and float(forward_cpu.group(1)) > 0
    assert "fieldkube_serve_predicted_count_count" in text
    assert "fieldkube_serve_mask_fraction_bucket" in text
    assert 'fieldkube_serve_model_info{architecture="segmenter-unet"' in text
    assert "fieldkube_serve_requests_in_flight" in text


def test_openapi_docs_describe_both_apis(server) -> None:
    docs = requests.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/count", "/v1/segment", "/v2/models/{name}/infer", "/v2/health/ready"} <= set(paths)
    assert set(paths["/v1/count"]["post"]["requestBody"]["content"]) == {
        "image/jpeg",
        "image/png",
        "image/tiff",
        "multipart/form-data",
    }
