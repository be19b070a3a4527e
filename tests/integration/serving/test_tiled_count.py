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


def _batch_histogram(url: str) -> tuple[float, float]:
    """(forward passes, tiles) of the counter so far, from the batch-size histogram in /metrics."""
    values = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'fieldkube_serve_batch_size_{part}{{task="counter"}}'):
                values[part] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def test_larger_tiles_run_in_smaller_batches_within_the_pixel_budget(start_server, bundles, images) -> None:
    """Batches of at most 2 tiles and the default budget (2 tiles of 256x256): two 256-px tiles of one
    image share a forward pass, two 512-px tiles run one per pass."""
    server = start_server(counter=str(bundles.counter), max_batch_size=2, max_batch_delay_s=0.5)
    before = _batch_histogram(server.url)
    for tile, (height, width) in ((256, (256, 512)), (512, (512, 1024))):
        image = images.png(images.field(3, height, width, 7))
        response = requests.post(
            f"{server.url}/v1/count", params={"tile": tile, "overlap": 0}, data=image, timeout=300
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["tiles"]) == 2
        after = _batch_histogram(server.url)
        passes, tiles = after[0] - before[0], after[1] - before[1]
        assert (passes, tiles) == ((1, 2) if tile == 256 else (2, 2)), (tile, passes, tiles)
        before = after
