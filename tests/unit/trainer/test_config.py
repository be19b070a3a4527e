"""The training config schema: defaults, YAML + --set overrides, errors naming the field, CRD-ready schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldkube.contract.config import (
    BUILTIN_MODELS,
    TrainingConfig,
    load_config,
    training_config_json_schema,
    validate_config,
)
from fieldkube.trainer.errors import ConfigError


def test_defaults_are_a_valid_counter_config() -> None:
    config = TrainingConfig()
    assert config.model.name == "counter-mcnn"
    assert config.train.loss == "auto"
    assert config.runtime.backend == "auto"


def test_yaml_file_and_set_overrides_combine(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "model:\n  name: segmenter-unet\n  params: {base_channels: 8, depth: 3}\ntrain:\n  lr: 0.01\n"
    )
    config = load_config(path, ["train.lr=1e-3", "tracking.alias=champion", "train.max_steps=5"])
    assert config.model.name == "segmenter-unet"
    assert config.model.params == {"base_channels": 8, "depth": 3}
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.max_steps == 5
    assert config.tracking.alias == "champion"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.loss=hinge", "train.loss"),
        ("model.name=resnet", "model.name"),
        ("runtime.backend=mpi", "runtime.backend"),
        ("train.lr_schedule=step", "train.lr_schedule"),
        ("train.lr_min_factor=1.5", "train.lr_min_factor"),
        ("train.unknown_field=1", "train.unknown_field"),
    ],
)
def test_invalid_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load_config(None, [override])


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])


def test_user_code_model_names_are_accepted() -> None:
    assert validate_config({"model": {"name": "mypkg.nets:TinyNet"}}).model.name == "mypkg.nets:TinyNet"


def test_builtin_model_names_match_the_vision_registry() -> None:
    from fieldkube.vision.models import MODEL_NAMES

    assert tuple(BUILTIN_MODELS) == tuple(MODEL_NAMES)


def test_json_schema_is_self_contained_for_a_crd() -> None:
    schema = training_config_json_schema()
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text
    lr = schema["properties"]["train"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and lr["description"]
    assert schema["properties"]["runtime"]["properties"]["backend"]["enum"] == [
        "auto",
        "single",
        "horovod",
        "ddp",
    ]


def test_config_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, fieldkube.contract.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_an_unknown_counter_head_is_one_line_naming_model_params_and_the_choices() -> None:
    from fieldkube.trainer.loop import build_task_model

    config = validate_config(
        {"model": {"name": "counter-fcrn", "params": {"base_channels": 2, "head": "exp"}}}
    )
    with pytest.raises(ConfigError) as caught:
        build_task_model(config)
    assert str(caught.value) == (
        "model.params for counter-fcrn: counter-fcrn: head must be one of linear, relu, softplus, clamp, "
        "eval-clamp, got 'exp'"
    )
