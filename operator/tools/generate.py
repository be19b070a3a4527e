"""Regenerate the operator's checked-in schema files: the trainer config schema, then the CRD YAML.

Run from the repository root with the development venv:  .venv/bin/python operator/tools/generate.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "operator/src/fieldkube/operator/training_config.schema.json"
CRD_PATH = ROOT / "manifests/crd/trainingjobs.yaml"
# The chart installs the CRD from its crds/; `make manifests` copies that file to manifests/crd/.
CHART_CRD_PATH = ROOT / "charts/fieldkube/crds/trainingjobs.yaml"


def generated_training_schema() -> dict[str, Any]:
    """The trainer's TrainingConfig as a structural schema minus the operator-owned paths."""
    from fieldkube.contract.config import TrainingConfig
    from fieldkube.operator.openapi import remove_paths, structural_schema
    from fieldkube.operator.training_schema import OPERATOR_OWNED

    full = structural_schema(TrainingConfig.model_json_schema())
    return remove_paths(full, sorted(OPERATOR_OWNED))


def render_training_schema() -> str:
    return json.dumps(generated_training_schema(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_PATH.write_text(render_training_schema(), encoding="utf-8")
    from fieldkube.operator.training_schema import training_schema

    training_schema.cache_clear()
    from fieldkube.operator.crd import render_crds

    for path, text in (
        (CRD_PATH, render_crds()),
        (CHART_CRD_PATH, render_crds()),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.relative_to(ROOT)}, the CRD YAML and the chart's copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
