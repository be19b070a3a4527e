"""The trainer's configuration schema as the CRD carries it: a checked-in JSON file, generated once.

One source of truth: `fieldkube.contract.config.TrainingConfig`. `operator/tools/generate.py` converts its
JSON schema to a structural schema, drops the sections the TrainingJob spec owns (OPERATOR_OWNED) and writes
`training_config.schema.json` next to this module; a unit test fails when the file is stale. Checked in,
like the CRD YAML it goes into, so a change to the configuration shows in review as a change to the API.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from fieldkube.operator.openapi import apply_defaults

SCHEMA_FILE = "training_config.schema.json"

# Trainer config paths set by the operator from other spec fields, so users cannot set them twice.
OPERATOR_OWNED = {
    "model": "spec.model",
    "tracking": "spec.mlflow",
    "checkpoint": "spec.checkpoint",
    "metrics": "the operator (metrics port 9400)",
    "output_dir": "the operator (/fieldkube/output)",
    "data.path": "spec.dataset",
}


@cache
def training_schema() -> dict[str, Any]:
    """Structural OpenAPI schema of `spec.training`."""
    text = resources.files("fieldkube.operator").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def training_defaults(training: dict[str, Any]) -> dict[str, Any]:
    """spec.training with every schema default filled in."""
    filled: dict[str, Any] = apply_defaults(training_schema(), training)
    return filled
