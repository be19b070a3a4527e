"""Soak: the `fieldkube-serve` command handles a few thousand small requests with bounded memory growth."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

WARM_UP = 200
SOAK = 2000
MAX_GROWTH_BYTES = 40 * 1024 * 1024


@pytest.fixture
def serve_process(bundles, tmp_path, loopback_port):
    """`fieldkube-serve` started as its own process (the console script) on a free loopback port."""
    port = loopback_port()
    command = [
        str(Path(sys.executable).parent / "fieldkube-serve"),
        "--counter",
        str(bundles.counter),
        "--segmenter",
        str(bundles.segmenter),
        "--port",
        str(port),
        "--torch-threads",
        "1",
        "--log-level",
        "warning",
    ]
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too busy to answer
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "serve.log").read_text()[-2000:])
            time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.slow
def test_thousands_of_requests_with_bounded_memory(serve_process, images) -> None:
    url, process = serve_process
    count_body = images.png(images.field(41, 48, 48, 3))
    segment_body = images.png(images.aerial(41, 48, 48))
    bad_body = count_body[:60]

    def burst(n: int, session: requests.Session) -> dict[int, int]:
        statuses: dict[int, int] = {}
        for i in range(n):
            kind = i % 4
            if kind == 3:
                response = session.post(f"{url}/v1/count", data=bad_body, timeout=60)
            elif kind == 2:
                response = session.post(f"{url}/v1/segment", data=segment_body, timeout=60)
            else:
                response = session.post(f"{url}/v1/count", data=count_body, timeout=60)
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
