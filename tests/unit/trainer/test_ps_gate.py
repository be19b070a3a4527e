"""The asynchronous parameter server's staleness gate and the parameter sharding, driven through many
random arrival orders: no gradient is ever applied more than the bound behind, and nobody waits forever."""

from __future__ import annotations

import random

import pytest

from fieldkube.trainer.ps import StalenessGate, shard_parameters


def _simulate(workers: int, bound: int, steps: int, seed: int) -> list[int]:
    """Workers finish their computations in random order; returns the staleness of every update."""
    rng = random.Random(seed)
    gate = StalenessGate(bound)
    for worker in range(workers):
        gate.request(worker)
    computing = set(gate.release())
    done = [0] * workers
    while computing:
        worker = rng.choice(sorted(computing))
        computing.discard(worker)
        gate.push(worker)
        done[worker] += 1
        if done[worker] < steps:
            gate.request(worker)
        computing.update(gate.release())
        assert computing or not gate.waiting, "workers wait while nobody computes"
    assert done == [steps] * workers
    return gate.observed


@pytest.mark.parametrize(("workers", "bound"), [(2, 0), (2, 1), (2, 3), (4, 0), (4, 2), (4, 5)])
def test_no_update_is_staler_than_the_bound(workers: int, bound: int) -> None:
    seen = [s for seed in range(30) for s in _simulate(workers, bound, 12, seed)]
    assert len(seen) == 30 * workers * 12
    assert max(seen) <= bound
    if bound > 0:
        assert max(seen) > 0  # the bound is used, not only respected by running one worker at a time


def test_bound_zero_is_sequential() -> None:
    gate = StalenessGate(0)
    gate.request(0)
    gate.request(1)
    assert gate.release() == [0]  # the second waits: it would be one version stale
    gate.push(0)
    gate.request(0)
    assert gate.release() == [1]
    assert gate.observed == [0]


def test_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="expected >= 0"):
        StalenessGate(-1)


def test_shards_cover_every_parameter_once_and_balance_sizes() -> None:
    sizes = [4000, 16, 3000, 8, 2900, 32, 100]
    shards = shard_parameters(sizes, 2)
    assert sorted(i for shard in shards for i in shard) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in shard) for shard in shards]
    assert sorted(loads) == [4156, 5900]  # the best split of these sizes into two
    assert shard_parameters(sizes, 1) == [list(range(len(sizes)))]
