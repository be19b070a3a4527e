"""The operator's metrics: failure reasons exported before the first failure, phases counted."""

from __future__ import annotations

from datetime import UTC, datetime

from fieldkube.operator import metrics


def sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_common_failure_reasons_are_exported_at_zero_before_any_failure() -> None:
    for reason in metrics.COMMON_FAILURE_REASONS:
        assert sample("fieldkube_trainingjob_failures_total", reason=reason) is not None


def test_a_failure_counts_once_under_its_reason() -> None:
    before = sample("fieldkube_trainingjob_failures_total", reason="OOMKilled") or 0.0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    created = "2025-12-31T23:00:00Z"
    for old, new in ((None, "Running"), ("Running", "Failed"), ("Failed", "Failed")):
        metrics.record_phase("uid-x", "team-a", old, new, created, created, None, 0, "OOMKilled", now)
    assert sample("fieldkube_trainingjob_failures_total", reason="OOMKilled") == before + 1
    assert sample("fieldkube_trainingjobs", phase="Failed") is not None
    metrics.forget_job("uid-x")
