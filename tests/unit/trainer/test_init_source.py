"""model.init_from: URI forms checked when the config is read, the architecture taken from the source or
checked against it (one line naming both), the density scale adopted, bundle directories read for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fieldkube.contract.config import ModelConfig, TrainingConfig, validate_config
from fieldkube.trainer.errors import ConfigError
from fieldkube.trainer.init_source import adopt_architecture, adopt_density_scale, fetch_init_source
from fieldkube.vision.bundle import BundleSpec, save_bundle
from fieldkube.vision.models import build_model, model_params

FCRN_4 = BundleSpec(name="counter-fcrn", task="counter", params={"base_channels": 4}, density_scale=50.0)


@pytest.mark.parametrize(
    "uri", ["models:/fieldkube-counter@champion", "models:/fieldkube-counter/3", "runs:/abc/model", "/m/b"]
)
def test_init_from_accepts_registry_run_and_path_forms(uri: str) -> None:
    assert validate_config({"model": {"init_from": uri}}).model.init_from == uri


@pytest.mark.parametrize("uri", ["models:/fieldkube-counter", "models:/a@b/c", "models:/a/latest", "  "])
def test_a_malformed_init_from_names_the_field(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"field 'model\.init_from'"):
        validate_config({"model": {"init_from": uri}}, "job.yaml")


def test_an_unset_architecture_is_taken_from_the_source() -> None:
    model = validate_config({"model": {"init_from": "models:/c@champion"}}).model
    adopted = adopt_architecture(model, FCRN_4, "models:/c@champion")
    assert (adopted.name, adopted.params) == ("counter-fcrn", {"base_channels": 4})
    assert adopted.init_from == "models:/c@champion"


def test_a_set_architecture_equal_to_the_sources_after_defaults_is_accepted() -> None:
    source = BundleSpec(name="counter-fcrn", task="counter", params={"base_channels": 32})
    model = ModelConfig(name="counter-fcrn")  # base_channels defaults to 32
    assert adopt_architecture(model, source, "s").params == {"base_channels": 32}


@pytest.mark.parametrize(
    ("set_fields", "asked"),
    [
        ({"name": "counter-mcnn"}, "counter-mcnn"),
        ({"name": "counter-fcrn", "params": {"base_channels": 8}}, "counter-fcrn {'base_channels': 8}"),
        ({"params": {"base_channels": 8}}, "counter-fcrn {'base_channels': 8}"),
    ],
)
def test_another_architecture_fails_in_one_line_naming_both(set_fields: dict, asked: str) -> None:
    model = ModelConfig(**set_fields)
    with pytest.raises(ConfigError) as caught:
        adopt_architecture(model, FCRN_4, "models:/c/2")
    message = str(caught.value)
    assert "\n" not in message
    assert "models:/c/2 is counter-fcrn {'base_channels': 4}" in message
    assert f"ask for {asked}:" in message


def test_the_density_scale_is_adopted_unless_set_differently() -> None:
    data = TrainingConfig().data
    assert adopt_density_scale(data, FCRN_4, "s").density_scale == 50.0
    chosen = validate_config({"data": {"density_scale": 100}}).data
    with pytest.raises(ConfigError, match=r"density_scale 50 but data\.density_scale is 100"):
        adopt_density_scale(chosen, FCRN_4, "s")


def test_a_bundle_directory_is_read_with_its_weights_and_lineage(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = build_model("counter-fcrn", base_channels=4)
    save_bundle(tmp_path / "b", model, "counter-fcrn", {"base_channels": 4}, density_scale=50.0)
    config = validate_config({"model": {"init_from": str(tmp_path / "b")}})
    source = fetch_init_source(config)
    assert source.spec.params == {"base_channels": 4, "head": model_params("counter-fcrn")["head"]}
    assert source.spec.density_scale == 50.0
    assert source.lineage == {"source": str((tmp_path / "b").resolve())}
    for key, value in model.state_dict().items():
        assert torch.equal(source.weights[key], value), key


def test_a_missing_bundle_or_an_mlflow_source_without_a_server_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"model\.init_from .*/nothing: no such bundle directory"):
        fetch_init_source(validate_config({"model": {"init_from": str(tmp_path / "nothing")}}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="needs a tracking server"):
        fetch_init_source(validate_config({"model": {"init_from": "models:/c@champion"}}))


def _bundle_from_before_head(directory: Path) -> Path:
    save_bundle(directory, build_model("counter-fcrn", base_channels=4), "counter-fcrn", {"base_channels": 4})
    spec_file = directory / "model.json"
    stored = json.loads(spec_file.read_text())
    del stored["params"]["head"]
    spec_file.write_text(json.dumps(stored))
    return directory


def test_a_champion_from_before_head_is_fine_tuned_with_the_linear_head(tmp_path: Path) -> None:
    bundle = _bundle_from_before_head(tmp_path / "old")
    config = validate_config({"model": {"init_from": str(bundle)}})
    source = fetch_init_source(config)
    adopted = adopt_architecture(config.model, source.spec, str(bundle))
    assert adopted.params == {"base_channels": 4, "head": "linear"}


def test_asking_another_head_than_the_sources_fails_naming_both(tmp_path: Path) -> None:
    bundle = _bundle_from_before_head(tmp_path / "old")
    asked = {"base_channels": 4, "head": "relu"}
    config = validate_config({"model": {"init_from": str(bundle), "params": asked}})
    with pytest.raises(ConfigError) as caught:
        adopt_architecture(config.model, fetch_init_source(config).spec, str(bundle))
    message = str(caught.value)
    assert "is counter-fcrn {'base_channels': 4, 'head': 'linear'} but" in message
    assert "ask for counter-fcrn {'base_channels': 4, 'head': 'relu'}:" in message
