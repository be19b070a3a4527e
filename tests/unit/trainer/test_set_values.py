"""`--set` values: what the operator writes (a JSON section per flag) reaches the trainer with its types."""

from __future__ import annotations

from typing import Any

import pytest

from fieldkube.operator.mpijob_builder import trainer_args
from fieldkube.trainer.config import load_config, parse_value


def _overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]


def test_a_number_written_by_json_as_1e_06_arrives_as_a_float() -> None:
    sections: dict[str, Any] = {
        "model": {"name": "counter-mcnn", "params": {"eps": 1e-6, "base_channels": 8, "note": "1e-06"}},
        "train": {"lr": 1e-4, "epochs": 2},
    }
    config = load_config(overrides=_overrides(trainer_args(sections)))
    assert config.model.params == {"eps": 1e-6, "base_channels": 8, "note": "1e-06"}
    assert isinstance(config.model.params["eps"], float) and config.train.lr == 1e-4


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
