"""SIGTERM stops `fieldkube-serve` at once even while requests wait for inference: they are answered 503
with Retry-After (to be retried on another replica), not computed first nor cut off."""

from __future__ import annotations

import signal
import threading
import time

import requests


def test_sigterm_answers_queued_requests_503_and_exits_at_once(start_serve_process, bundles, images) -> None:
    serve = start_serve_process(
        "--counter", str(bundles.counter), "--torch-threads", "1", "--log-level", "warning",
        "--max-batch-size", "64", "--max-batch-delay-s", "120", "--shutdown-timeout-s", "2",
    )  # fmt: skip
    answers: list[requests.Response] = []

    def client() -> None:
        data = images.png(images.field(1, 64, 64, 2))
        answers.append(requests.post(f"{serve.url}/v1/count", data=data, timeout=60))

    waiting = threading.Thread(target=client)
    waiting.start()
    deadline = time.monotonic() + 30
    while (
        'fieldkube_serve_queued_tiles{task="counter"} 1.0'
        not in requests.get(f"{serve.url}/metrics", timeout=10).text
    ):
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.05)
    started = time.monotonic()
    serve.process.terminate()
    serve.process.wait(timeout=60)
    elapsed = time.monotonic() - started
    waiting.join(timeout=60)
    assert elapsed < 15, f"shutdown took {elapsed:.1f} s; the batch delay alone is 120 s"
    assert serve.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert len(answers) == 1
    assert answers[0].status_code == 503
    assert answers[0].headers["Retry-After"] == "1"
    assert "shutting down" in answers[0].json()["error"]
    assert "Traceback" not in serve.log_path.read_text()
