"""Large images: uploads streamed to disk, and admission by pixels before decoding (real server, real
HTTP clients; the burst runs `fieldkube-serve` as its own process so its memory can be measured)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import requests
import tifffile

from fieldkube.serving.admission import BYTES_PER_PIXEL

SIDE = 5096  # 5096 x 5096 = 25.97 MP: just under the 26 MP default image limit


def big_field(images, side: int) -> np.ndarray:
    """A side x side field image: a 256 px synthetic field repeated (real texture, quick to make)."""
    patch = images.field(7, 256, 256, 6)
    reps = -(-side // 256)
    return np.ascontiguousarray(np.tile(patch, (reps, reps, 1))[:side, :side])


def test_an_uncompressed_5000x5000_tiff_is_served(start_server, bundles, images) -> None:
    """75 MB of body: more than the old 64 MiB limit, streamed to disk instead of held in memory."""
    image = big_field(images, 5000)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, compression=None)
    body = buffer.getvalue()
    assert len(body) > 75_000_000
    server = start_server(counter=str(bundles.counter), request_timeout_s=600)
    response = requests.post(
        f"{server.url}/v1/count?tile=1024",
        data=body,
        headers={"Content-Type": "image/tiff"},
        timeout=600,
    )
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    assert (answer["width"], answer["height"]) == (5000, 5000)
    assert answer["count"] is not None and answer["count"] > 0
    assert abs(sum(cell["count"] for cell in answer["tiles"]) - answer["count"]) < 1e-3 * answer["count"]


class RssSampler(threading.Thread):
    """Peak resident memory of a process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


def test_a_burst_of_26_megapixel_uploads_gets_429s_not_memory(start_serve_process, bundles, images) -> None:
    """32 uploads of a 26 MP image at once, with room for one image in flight: the others are refused
    from their header with 429 + Retry-After before decoding, and the server's memory stays within the
    documented bound (one image in flight: max_inflight_pixels x BYTES_PER_PIXEL above idle)."""
    budget = 26_000_000
    server = start_serve_process(
        "--counter",
        str(bundles.counter),
        "--torch-threads",
        "1",
        "--max-pixels",
        str(budget),
        "--max-inflight-pixels",
        str(budget),
        "--request-timeout-s",
        "600",
    )
    small = images.png(images.field(1, 256, 256, 4))
    assert requests.post(f"{server.url}/v1/count", data=small, timeout=60).status_code == 200
    image = big_field(images, SIDE)
    image[:, :, 1] //= 2  # a flatter green compresses faster; the pixel count is what matters
    body = images.png(image)
    sampler = RssSampler(server.process.pid)
    idle = sampler.peak
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(
                pool.map(
                    lambda _: requests.post(f"{server.url}/v1/count?tile=1024", data=body, timeout=600),
                    range(32),
                )
            )
    finally:
        sampler.stop.set()
        sampler.join()
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 429}, [a.text[:200] for a in answers if a.status_code not in (200, 429)]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1
            assert f"needs {SIDE * SIDE} more (limit {budget})" in answer.json()["error"]
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    series = 'fieldkube_serve_rejected_requests_total{reason="pixel_budget",task="counter"}'
    refused = f"{series} {statuses.count(429)}.0"
    assert refused in metrics, [line for line in metrics.splitlines() if "rejected" in line]
    grown = sampler.peak - idle
    bound = budget * BYTES_PER_PIXEL
    mib = 2**20
    print(f"idle RSS {idle / mib:.0f} MiB, peak {sampler.peak / mib:.0f} MiB, bound +{bound / mib:.0f} MiB")
    assert grown <= bound, f"RSS grew by {grown / mib:.0f} MiB; the bound is {bound / mib:.0f} MiB"
