"""Configuration: flags over environment, clear errors naming the setting, model URI forms."""

from __future__ import annotations

import pytest

from fieldkube.serving.cli import parse_settings
from fieldkube.serving.model_source import parse_model_source
from fieldkube.serving.settings import SettingsError, build_settings, default_batch_pixels


def test_environment_fills_settings_and_flags_override_it() -> None:
    env = {
        "FIELDKUBE_SERVE_COUNTER": "models:/fieldkube-counter@champion",
        "FIELDKUBE_SERVE_MAX_BATCH_SIZE": "8",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    }
    settings = parse_settings(["--max-batch-size", "4", "--port", "9000"], environ=env)
    assert settings.counter == "models:/fieldkube-counter@champion"
    assert settings.max_batch_size == 4
    assert settings.port == 9000
    assert settings.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert settings.host == "127.0.0.1"


def test_bad_value_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="max_batch_size: Input should be greater than or equal to 1"):
        build_settings({"counter": "/m", "max_batch_size": "0"}, environ={})


def test_the_pixel_budget_of_a_batch_defaults_to_full_batches_of_256_pixel_tiles() -> None:
    assert build_settings({"counter": "/m"}, environ={}).max_batch_pixels is None
    assert default_batch_pixels(4) == 4 * 256 * 256
    env = {
        "FIELDKUBE_SERVE_COUNTER": "models:/fieldkube-counter@champion",
        "FIELDKUBE_SERVE_MAX_BATCH_PIXELS": "9",
    }
    assert parse_settings([], environ=env).max_batch_pixels == 9
    assert parse_settings(["--max-batch-pixels", "5"], environ=env).max_batch_pixels == 5
    with pytest.raises(SettingsError, match="max_batch_pixels: Input should be greater than or equal to 1"):
        build_settings({"counter": "/m", "max_batch_pixels": "0"}, environ={})


def test_no_model_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="no model configured"):
        build_settings({}, environ={})


def test_cli_exits_with_a_message_for_a_malformed_model_uri(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--counter", "models:/a/b/c"], environ={})
    assert exit_info.value.code == 2
    assert "counter: model URI 'models:/a/b/c' is malformed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("uri", "kind", "name", "alias", "version"),
    [
        ("models:/fieldkube-counter@champion", "alias", "fieldkube-counter", "champion", None),
        ("models:/fieldkube-counter/3", "version", "fieldkube-counter", None, "3"),
        ("runs:/abc/model", "mlflow", None, None, None),
        ("/srv/models/counter", "path", None, None, None),
        ("file:///srv/models/counter", "path", None, None, None),
    ],
)
def test_model_uri_forms(
    uri: str, kind: str, name: str | None, alias: str | None, version: str | None
) -> None:
    source = parse_model_source(uri)
    assert (source.kind, source.registered_name, source.alias, source.version) == (kind, name, alias, version)
    assert source.watchable == (kind == "alias")


def test_cli_exits_with_a_message_for_a_path_that_is_not_a_bundle(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--segmenter", str(tmp_path / "missing")], environ={})
    assert exit_info.value.code == 2
    assert f"segmenter: {tmp_path / 'missing'} is not a model bundle directory" in capsys.readouterr().err


def test_every_reload_outcome_is_exported_at_zero_before_the_first_load() -> None:
    """increase() cannot see a counter's first increment if the series only appears with it."""
    from prometheus_client import generate_latest

    from fieldkube.serving.metrics import ServeMetrics
    from fieldkube.serving.registry import RELOAD_OUTCOMES, ModelRegistry

    metrics = ServeMetrics(gpu=False)
    registry = ModelRegistry(build_settings({"counter": "models:/fieldkube-counter@champion"}, {}), metrics)
    registry.close()
    text = generate_latest(metrics.registry).decode()
    for outcome in RELOAD_OUTCOMES:
        assert f'fieldkube_serve_model_reloads_total{{outcome="{outcome}",task="counter"}} 0.0' in text
    assert 'task="segmenter"' not in text


def test_load_retries_back_off_exponentially_up_to_the_cap() -> None:
    from fieldkube.serving.metrics import ServeMetrics
    from fieldkube.serving.registry import ModelRegistry

    settings = build_settings(
        {"counter": "models:/c@a", "load_retry_initial_s": 0.5, "load_retry_max_s": 3.0}, {}
    )
    registry = ModelRegistry(settings, ServeMetrics(gpu=False))
    registry.close()
    assert [registry.retry_delay_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert registry.retry_delay_s(10_000) == 3.0


def test_an_unreachable_registry_is_retried_after_the_backoff_not_at_every_poll(monkeypatch) -> None:
    from prometheus_client import generate_latest

    from fieldkube.serving.metrics import ServeMetrics
    from fieldkube.serving.registry import ModelRegistry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    metrics = ServeMetrics(gpu=False)
    settings = build_settings(
        {
            "counter": "models:/fieldkube-counter@champion",
            "mlflow_tracking_uri": "http://127.0.0.1:9",  # discard port: nothing answers
            "load_retry_initial_s": 60.0,
        },
        {},
    )
    registry = ModelRegistry(settings, metrics)
    try:
        assert registry.refresh("counter") is False
        assert registry.refresh("counter") is False  # within the backoff: not attempted again
        pending = registry.next_retry_in_s()
        assert pending is not None and 50.0 < pending <= 60.0
        text = generate_latest(metrics.registry).decode()
        assert 'fieldkube_serve_model_reloads_total{outcome="resolve_failed",task="counter"} 1.0' in text
        assert "attempt 1; retrying in 60 s" in registry.last_error["counter"]
        assert not registry.ready()
    finally:
        registry.close()


def test_a_model_that_fails_its_checks_is_rejected_without_retrying(tmp_path) -> None:
    import torch
    from prometheus_client import generate_latest

    from fieldkube.serving.metrics import ServeMetrics
    from fieldkube.serving.registry import ModelRegistry
    from fieldkube.vision.bundle import save_bundle
    from fieldkube.vision.models import build_model

    params = {"width": 0.25}
    torch.manual_seed(0)
    save_bundle(tmp_path / "c", build_model("counter-mcnn", **params), "counter-mcnn", params, tile=32)
    metrics = ServeMetrics(gpu=False)
    registry = ModelRegistry(build_settings({"segmenter": str(tmp_path / "c")}, {}), metrics)
    try:
        assert registry.refresh("segmenter") is False
        assert registry.next_retry_in_s() is None
        text = generate_latest(metrics.registry).decode()
        assert 'fieldkube_serve_model_reloads_total{outcome="rejected",task="segmenter"} 1.0' in text
        assert "expected a segmenter model" in registry.last_error["segmenter"]
    finally:
        registry.close()
