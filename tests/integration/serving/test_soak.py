"""Soak: the `fieldkube-serve` command handles a few thousand small requests with bounded memory growth.

The mix: multipart counts, OIP v2 JSON tensors, raw-body segmentations and truncated images (400).
"""

from __future__ import annotations

import psutil
import pytest
import requests

WARM_UP = 200
SOAK = 2000
MAX_GROWTH_BYTES = 40 * 1024 * 1024


@pytest.mark.slow
def test_thousands_of_requests_with_bounded_memory(start_serve_process, bundles, images) -> None:
    serve = start_serve_process(
        "--counter", str(bundles.counter), "--segmenter", str(bundles.segmenter),
        "--torch-threads", "1", "--log-level", "warning",
    )  # fmt: skip
    url, process = serve.url, serve.process
    count_body = images.png(images.field(41, 48, 48, 3))
    segment_body = images.png(images.aerial(41, 48, 48))
    bad_body = count_body[:60]
    pixels = images.field(42, 48, 48, 3)
    infer_body = {
        "inputs": [
            {
                "name": "image",
                "shape": list(pixels.shape),
                "datatype": "UINT8",
                "data": pixels.ravel().tolist(),
            }
        ]
    }

    def burst(n: int, session: requests.Session) -> dict[int, int]:
        statuses: dict[int, int] = {}
        for i in range(n):
            kind = i % 4
            if kind == 3:
                response = session.post(f"{url}/v1/count", data=bad_body, timeout=60)
            elif kind == 2:
                response = session.post(f"{url}/v1/segment", data=segment_body, timeout=60)
            elif kind == 1:
                response = session.post(f"{url}/v2/models/counter/infer", json=infer_body, timeout=60)
            else:
                files = {"file": ("field.png", count_body, "image/png")}
                response = session.post(f"{url}/v1/count", files=files, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        return statuses

    memory = psutil.Process(process.pid)
    with requests.Session() as session:
        burst(WARM_UP, session)
        before = memory.memory_info().rss
        statuses = burst(SOAK, session)
        after = memory.memory_info().rss
    print(
        f"soak: {SOAK} requests, RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, statuses {statuses}"
    )
    assert statuses == {200: SOAK * 3 // 4, 400: SOAK // 4}
    assert after - before < MAX_GROWTH_BYTES, (before, after)
    assert process.poll() is None
