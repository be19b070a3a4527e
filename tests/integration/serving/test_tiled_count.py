"""Counting a large image through the service's tiles equals counting it in one forward pass (<= 0.5 %).

Tiles of 256 pixels with 64 overlap (28 tiles for 1280x720): the serving size of a production model. The
remaining difference is the zero padding a tile's border pixels see; the cosine blend keeps it small.
"""

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
        f"{server.url}/v1/count", params={"tile": 256, "overlap": 64}, data=images.png(image), timeout=300
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["tile"], body["overlap"]) == (256, 64)
    assert len(body["tiles"]) == 3 * 5  # the per-tile counts are on a non-overlapping 256-pixel grid
    assert whole > 10
    relative = abs(body["count"] - whole) / whole
    print(f"tiled {body['count']:.3f} whole {whole:.3f} relative difference {relative:.5f}")
    assert relative <= 0.005, (body["count"], whole)
