"""Dynamic batching: concurrent requests share forward passes and still get exactly their own results."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from fieldkube.serving.batcher import BATCHES_IN_FLIGHT, InferenceTimeoutError, OverloadedError, TileBatcher
from fieldkube.serving.metrics import ServeMetrics
from fieldkube.serving.served_model import PendingBatch, ServedModel
from fieldkube.vision.models import build_model


def _model() -> ServedModel:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = build_model("counter-mcnn", width=0.25).eval()
    with torch.no_grad():  # maps above 0 (the untrained fuse clamps them all to 0): a misplaced map shows
        module.fuse.bias.fill_(1.0)
    return ServedModel(
        task="counter",
        name="counter-mcnn",
        version="1",
        architecture="counter-mcnn",
        tile=32,
        density_scale=2.0,
        module=module,
        device=torch.device("cpu"),
        source="test",
    )


def _batch_sizes(metrics: ServeMetrics) -> tuple[float, float]:
    samples = {s.name: s.value for m in metrics.batch_size.collect() for s in m.samples}
    return samples["fieldkube_serve_batch_size_count"], samples["fieldkube_serve_batch_size_sum"]


def _run(coro_factory, **batcher_args):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        metrics = ServeMetrics(gpu=False)
        with ThreadPoolExecutor(max_workers=BATCHES_IN_FLIGHT) as executor:
            args = {
                "max_batch_size": 8,
                "max_batch_pixels": 8 * 32 * 32,  # full batches of the tests' 32-px tiles
                "max_batch_delay_s": 0.05,
                "max_queue_tiles": 64,
                "request_timeout_s": 30.0,
                **batcher_args,
            }
            batcher = TileBatcher("counter", metrics, executor=executor, **args)
            batcher.start()
            try:
                return await coro_factory(batcher), metrics
            finally:
                await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (3, 2, 3)]
    expected = [model.forward(tiles) for tiles in requests]

    async def scenario(batcher: TileBatcher) -> list[list[torch.Tensor]]:
        return list(await asyncio.gather(*(batcher.infer(model, tiles) for tiles in requests)))

    results, metrics = _run(scenario)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(torch.cat(got).numpy(), want, rtol=1e-4, atol=1e-5)
    batches, tiles = _batch_sizes(metrics)
    assert tiles == 8
    assert batches < 3, "tiles of concurrent requests should have shared forward passes"


def test_batches_never_exceed_the_maximum_size() -> None:
    model = _model()
    tiles = np.random.default_rng(2).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)

    async def scenario(batcher: TileBatcher) -> list[torch.Tensor]:
        return await batcher.infer(model, tiles)

    result, metrics = _run(scenario, max_batch_size=4)
    assert [piece.shape for piece in result] == [(4, 1, 32, 32), (4, 1, 32, 32), (2, 1, 32, 32)]
    np.testing.assert_allclose(torch.cat(result).numpy(), model.forward(tiles), rtol=1e-4, atol=1e-5)
    assert _batch_sizes(metrics) == (3, 10)  # 4 + 4 + 2


def test_a_request_split_over_batches_gets_its_maps_in_tile_order() -> None:
    """Two requests of 5 tiles in batches of 4: each runs in two batches, one shared with the other
    request; the pieces come back in tile order and are the maps of the request's own tiles."""
    model = _model()
    rng = np.random.default_rng(3)
    requests = [rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    expected = [model.forward(tiles) for tiles in requests]
    assert float(np.abs(expected[0] - expected[1]).max()) > 0, "the maps must tell the requests apart"

    async def scenario(batcher: TileBatcher) -> list[list[torch.Tensor]]:
        return list(await asyncio.gather(*(batcher.infer(model, tiles) for tiles in requests)))

    results, metrics = _run(scenario, max_batch_size=4)
    assert [[piece.shape[0] for piece in pieces] for pieces in results] == [[4, 1], [3, 2]]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(torch.cat(got).numpy(), want, rtol=1e-4, atol=1e-5)
    assert _batch_sizes(metrics) == (3, 10)


def test_larger_tiles_run_in_batches_held_to_the_pixel_budget() -> None:
    """A budget of two 64-px tiles: batches of 4 tiles of 16 or 32 px (the size limit), 2 of 64 px, and
    a 128-px tile, above the budget alone, still runs, one per pass."""
    metrics = ServeMetrics(gpu=False)
    with ThreadPoolExecutor(1) as executor:
        batcher = TileBatcher("counter", metrics, 4, 2 * 64 * 64, 0.01, 64, 5.0, executor)
    assert [batcher.batch_limit((t, t, 3)) for t in (16, 32, 64, 128)] == [4, 4, 2, 1]

    model = _model()
    tiles = np.random.default_rng(5).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)

    async def scenario(batcher: TileBatcher) -> list[torch.Tensor]:
        return await batcher.infer(model, tiles)

    result, metrics = _run(scenario, max_batch_size=4, max_batch_pixels=2 * 64 * 64)
    assert [piece.shape[0] for piece in result] == [2, 2, 1]
    np.testing.assert_allclose(torch.cat(result).numpy(), model.forward(tiles), rtol=1e-4, atol=1e-5)
    assert _batch_sizes(metrics) == (3, 5)


def test_full_queue_refuses_with_a_retry_hint() -> None:
    model = _model()

    async def scenario(batcher: TileBatcher) -> None:
        await batcher.infer(model, np.zeros((5, 32, 32, 3), dtype=np.uint8))

    with pytest.raises(OverloadedError, match="queue is full") as error:
        _run(scenario, max_queue_tiles=4)
    assert error.value.retry_after_s >= 1


def test_request_timeout_is_reported_and_the_queue_drains() -> None:
    model = _model()

    async def scenario(batcher: TileBatcher) -> int:
        with pytest.raises(InferenceTimeoutError, match="did not finish within"):
            await batcher.infer(model, np.zeros((40, 32, 32, 3), dtype=np.uint8))
        return batcher.queued_tiles

    queued, _ = _run(scenario, request_timeout_s=0.01, max_batch_size=1)
    assert queued == 0


def test_every_rejection_reason_is_exported_at_zero_before_the_first_rejection() -> None:
    """The shedding alert takes rate() of this counter: a series that appears with its first rejection
    gives rate() no earlier point, so that first burst would never fire it."""
    from prometheus_client import generate_latest

    from fieldkube.serving.batcher import REJECT_REASONS

    metrics = ServeMetrics(gpu=False)
    with ThreadPoolExecutor(1) as executor:
        TileBatcher("counter", metrics, 4, 4 * 32 * 32, 0.01, 16, 5.0, executor)
    text = generate_latest(metrics.registry).decode()
    for reason in REJECT_REASONS:
        assert f'fieldkube_serve_rejected_requests_total{{reason="{reason}",task="counter"}} 0.0' in text
    assert 'task="segmenter"' not in text


class _GatedModule(torch.nn.Module):
    """Wraps a model: each forward pass logs itself and waits until the test lets one through."""

    def __init__(self, inner: torch.nn.Module, log: list[tuple[str, int]]) -> None:
        super().__init__()
        self.inner = inner
        self.log = log
        self.gate = threading.Semaphore(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(("forward", int(x.shape[0])))
        assert self.gate.acquire(timeout=30), "the test never let this forward pass through"
        return self.inner(x)


@dataclass(frozen=True, eq=False)
class _LoggedModel(ServedModel):
    """The real model, logging each batch it prepares."""

    log: list[tuple[str, int]] = field(default_factory=list)

    def prepare(self, parts: Sequence[np.ndarray | torch.Tensor]) -> PendingBatch:
        self.log.append(("prepare", sum(int(p.shape[0]) for p in parts)))
        return super().prepare(parts)


def test_the_next_batch_is_prepared_while_one_runs_and_no_further() -> None:
    plain = _model()
    log: list[tuple[str, int]] = []
    gated = _GatedModule(plain.module, log)
    model = _LoggedModel(**{**plain.__dict__, "module": gated, "log": log})
    rng = np.random.default_rng(1)
    requests = [rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    expected = [plain.forward(tiles) for tiles in requests]

    async def until(count: int) -> None:
        for _ in range(300):
            if len(log) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"expected {count} steps, saw {log}")

    async def scenario(batcher: TileBatcher) -> list[list[torch.Tensor]]:
        jobs = [asyncio.create_task(batcher.infer(model, tiles)) for tiles in requests]
        try:
            await until(3)  # batch 1 prepared and running; batch 2 prepared meanwhile
            await asyncio.sleep(0.3)
            assert log[0] == ("prepare", 8), log
            assert sorted(log[1:]) == [("forward", 8), ("prepare", 8)], log  # batch 3 waits for a slot
            gated.gate.release()
            await until(5)  # batch 1 done: batch 2 runs, batch 3 is prepared
            assert sorted(log[3:]) == [("forward", 8), ("prepare", 8)], log
        finally:
            gated.gate.release(3)  # whatever happened, no forward pass stays blocked
        return list(await asyncio.gather(*jobs))

    results, metrics = _run(scenario)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(torch.cat(got).numpy(), want)
    assert _batch_sizes(metrics) == (3, 24)


def test_a_failed_forward_fails_its_requests_and_the_next_batch_still_runs() -> None:
    plain = _model()
    log: list[tuple[str, int]] = []
    gated = _GatedModule(plain.module, log)
    model = _LoggedModel(**{**plain.__dict__, "module": gated, "log": log})
    broken = _LoggedModel(**{**plain.__dict__, "module": torch.nn.Conv2d(1, 1, 1), "log": log})
    tiles = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)

    async def scenario(batcher: TileBatcher) -> list[torch.Tensor]:
        gated.gate.release()
        failing = asyncio.create_task(batcher.infer(broken, tiles))
        working = asyncio.create_task(batcher.infer(model, tiles))
        with pytest.raises(RuntimeError, match="channels"):
            await failing
        return await working

    result, _ = _run(scenario)
    np.testing.assert_array_equal(torch.cat(result).numpy(), plain.forward(tiles))
