"""Counting a large image through the service's tiles equals counting it in one forward pass (<= 0.5 %)."""

from __future__ import annotations

import numpy as np
import requests

from fieldkube.vision.bundle import load_bundle
from fieldkube.vision.predict import predict_whole


def test_tiled_count_of_a_large_image_equals_the_whole_image_count(server, bundles, images) -> None:
    image = images.field(21, 720, 1280, 150)
    loaded = load_bundle(bundles.counter)
    whole = float(np.sum(predict_whole(loaded.model, image), dtype=np.float64)) / loaded.spec.density_scale
    response = requests.post(
        f"{server.url}/v1/count", params={"tile": 224, "overlap": 64}, data=images.png(image), timeout=300
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tile"] == 224 and len(body["tiles"]) == 4 * 6
    assert whole > 10
    relative = abs(body["count"] - whole) / whole
    print(f"tiled {body['count']:.3f} whole {whole:.3f} relative difference {relative:.5f}")
    assert relative <= 0.005, (body["count"], whole)
