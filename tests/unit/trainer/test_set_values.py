"""Values keep their types: the operator's JSON document reaches the trainer as written, and hand-typed
`--set` values keep their YAML meaning."""

from __future__ import annotations

from typing import Any

import pytest

from fieldkube.contract.config import load_config_document, parse_value
from fieldkube.operator.mpijob_builder import config_env
from fieldkube.trainer.errors import ConfigError


def test_a_number_written_by_json_as_1e_06_arrives_as_a_float() -> None:
    sections: dict[str, Any] = {
        "model": {"name": "counter-mcnn", "params": {"eps": 1e-6, "base_channels": 8, "note": "1e-06"}},
        "train": {"lr": 1e-4, "epochs": 2},
    }
    config = load_config_document(config_env(sections)["value"], "$FIELDKUBE_TRAINING_CONFIG")
    assert config.model.params == {"eps": 1e-6, "base_channels": 8, "note": "1e-06"}
    assert isinstance(config.model.params["eps"], float) and config.train.lr == 1e-4


def test_a_bad_document_or_field_is_one_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^\$CFG: not a JSON document"):
        load_config_document("{model:", "$CFG")
    with pytest.raises(ConfigError, match=r"^\$CFG: expected a JSON object"):
        load_config_document("[1]", "$CFG")
    with pytest.raises(ConfigError, match=r"\$CFG.*train\.epochs"):
        load_config_document('{"train": {"epochs": "many"}}', "$CFG")
    overridden = load_config_document('{"train": {"epochs": 2}}', "$CFG", ["train.epochs=5"])
    assert overridden.train.epochs == 5


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 1e-3),
        ("0.5", 0.5),
        ("true", True),
        ("yes", True),
        ("[1, 2]", [1, 2]),
        ("champion", "champion"),
    ],
)
def test_hand_typed_values_keep_their_yaml_meaning(text: str, value: Any) -> None:
    assert parse_value(text) == value
