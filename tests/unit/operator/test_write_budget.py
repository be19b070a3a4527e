"""The status-write budget: a burst at once, then reserved slots spread at the rate, refilled by time."""

from __future__ import annotations

import pytest

from fieldkube.operator.write_budget import WriteBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_at_once_and_the_rest_get_slots_spread_at_the_rate() -> None:
    clock = Clock()
    budget = WriteBudget(writes_per_second=10, burst=3, clock=clock)
    assert [budget.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [budget.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3])  # each caller its own slot, not all at the same instant


def test_time_refills_tokens_up_to_the_burst_only() -> None:
    clock = Clock()
    budget = WriteBudget(writes_per_second=10, burst=2, clock=clock)
    budget.reserve()
    budget.reserve()
    assert budget.reserve() == pytest.approx(0.1)
    clock.now += 0.3  # pays the reserved slot back, then refills 2 tokens
    assert budget.reserve() == 0.0
    clock.now += 60  # a long quiet spell does not save up more than the burst
    assert [budget.reserve() for _ in range(2)] == [0.0, 0.0]
    assert budget.reserve() == pytest.approx(0.1)


def test_a_cancelled_reservation_gives_its_slot_back() -> None:
    clock = Clock()
    budget = WriteBudget(writes_per_second=5, burst=1, clock=clock)
    budget.reserve()
    assert budget.reserve() == pytest.approx(0.2)
    budget.cancel()  # that job was deleted before its slot
    assert budget.reserve() == pytest.approx(0.2)


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (5, 0)])
def test_a_budget_that_allows_nothing_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="positive rate and burst"):
        WriteBudget(writes_per_second=rate, burst=burst)
