"""The typed spec, the generated CRD and the trainer-schema file agree with their sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fieldkube.operator import crd, spec
from fieldkube.operator.openapi import apply_defaults, remove_paths, structural_schema
from fieldkube.operator.quantity import format_bytes, parse_quantity
from fieldkube.operator.training_schema import OPERATOR_OWNED, training_schema

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "operator/tools"))
import generate  # noqa: E402


def test_checked_in_crd_equals_the_generated_one() -> None:
    checked_in = (ROOT / "manifests/crd/trainingjobs.yaml").read_text()
    assert checked_in == crd.render_crds(), "stale CRD: run `make operator-generate`"


def test_helm_chart_carries_the_same_crd() -> None:
    assert generate.CHART_CRD_PATH.read_text() == crd.render_crds(), "stale CRD: run `make operator-generate`"


def test_checked_in_training_schema_equals_the_trainers_model() -> None:
    checked_in = json.loads((ROOT / generate.SCHEMA_PATH).read_text())
    assert checked_in == generate.generated_training_schema(), "stale schema: run `make operator-generate`"


def test_training_schema_omits_exactly_the_operator_owned_fields() -> None:
    props = training_schema()["properties"]
    assert {"data", "train", "runtime"} <= set(props)
    for path in OPERATOR_OWNED:
        head, _, leaf = path.partition(".")
        assert (leaf not in props[head]["properties"]) if leaf else head not in props


def test_builtin_model_names_match_the_trainer() -> None:
    from fieldkube.trainer.config import BUILTIN_MODELS

    assert tuple(BUILTIN_MODELS) == spec.BUILTIN_MODELS


def test_crd_names_group_version_printer_columns() -> None:
    doc = crd.trainingjob_crd()
    assert doc["metadata"]["name"] == "trainingjobs.fieldkube.io"
    assert doc["spec"]["names"]["shortNames"] == ["tj"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Model", "Workers", "GPUs", "Phase", "Progress", "Reason", "Age"]


def test_crd_schema_has_bounds_defaults_and_cel_rules() -> None:
    root = crd.trainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    props = root["properties"]["spec"]["properties"]
    assert props["workers"]["minimum"] == 1 and props["workers"]["default"] == 1
    assert (props["gpusPerWorker"]["minimum"], props["gpusPerWorker"]["maximum"]) == (0, 16)
    assert {"rule": "self == oldSelf", "message": "spec.model is immutable once the job exists"} in props[
        "model"
    ]["x-kubernetes-validations"]
    assert props["runPolicy"]["properties"]["cleanPodPolicy"]["enum"] == ["Running", "All", "None"]
    assert props["training"]["properties"]["train"]["properties"]["epochs"]["default"] == 10
    assert props["training"]["default"] == {} and props["runPolicy"]["default"] == {}
    assert root["properties"]["spec"]["required"] == ["dataset"]
    assert "name" in root["x-kubernetes-validations"][0]["rule"]

    def walk(node: object) -> None:  # structural: no refs, no anyOf, no titles anywhere
        if isinstance(node, dict):
            assert not {"$ref", "anyOf", "title", "$defs"} & set(node), node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(root)


def test_spec_defaults_and_derived_numbers() -> None:
    parsed = spec.parse_spec({"dataset": {"path": "d"}, "workers": 3, "gpusPerWorker": 2})
    assert (parsed.slots_per_worker, parsed.world_size, parsed.total_gpus) == (2, 6, 6)
    assert parsed.runPolicy.cleanPodPolicy == "Running" and parsed.model.name == "counter-mcnn"
    cpu_only = spec.parse_spec({"dataset": {"path": "d"}, "gpusPerWorker": 0})
    assert (cpu_only.slots_per_worker, cpu_only.total_gpus) == (1, 0)
    assert (
        spec.parse_spec({"dataset": {"path": "d"}, "model": {"name": "segmenter-unet"}}).model.task
        == "segmenter"
    )


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"gpusPerWorker": 17}, "gpusPerWorker"),
        ({"model": {"name": "resnet"}}, "model.name"),
        ({"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "runPolicy.cleanPodPolicy"),
        ({"colour": "blue"}, "colour"),
        ({"resources": {"memory": "lots"}}, "resources.memory"),
        ({"resources": {"memory": "1..5Gi"}}, "resources.memory"),
        ({"resources": {"sharedMemory": "4Qi"}}, "resources.sharedMemory"),
    ],
)
def test_invalid_spec_errors_name_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        spec.parse_spec({"dataset": {"path": "d"}, **patch})
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert field in locs


def test_structural_schema_conversion_rules() -> None:
    source = {
        "type": "object",
        "title": "X",
        "properties": {
            "a": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}], "default": None},
            "b": {"type": "number", "exclusiveMinimum": 0},
            "c": {"type": "object", "additionalProperties": True},
            "d": {"$ref": "#/$defs/D"},
            "e": {"const": "x"},
        },
        "$defs": {"D": {"type": "object", "properties": {"z": {"type": "integer", "default": 3}}}},
    }
    out = structural_schema(source)
    assert out["properties"]["a"] == {"type": "integer", "minimum": 1}
    assert out["properties"]["b"] == {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert out["properties"]["c"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert out["properties"]["d"]["default"] == {}
    assert out["properties"]["e"] == {"enum": ["x"], "type": "string"}
    assert apply_defaults(out, {}) == {"d": {"z": 3}}
    assert "d" not in remove_paths(out, ["d"])["properties"]


def test_checked_in_example_manifests_parse_into_the_typed_spec() -> None:
    examples = sorted((ROOT / "manifests/examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "TrainingJob", path
            spec.parse_spec(doc["spec"])


def test_crd_has_an_optional_shared_memory_that_says_it_counts_against_memory() -> None:
    root = crd.trainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    resources = root["properties"]["spec"]["properties"]["resources"]
    shm = resources["properties"]["sharedMemory"]
    assert shm["type"] == "string" and shm["pattern"] == spec.QUANTITY_PATTERN
    assert "default" not in shm and "sharedMemory" not in resources.get("required", [])
    assert "half of memory" in shm["description"] and "memory limit" in shm["description"]
    docs = yaml.safe_load_all((ROOT / "manifests/crd/trainingjobs.yaml").read_text())
    checked_in = next(d for d in docs if d["metadata"]["name"] == "trainingjobs.fieldkube.io")
    spec_schema = checked_in["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["properties"]["resources"]["properties"]["sharedMemory"] == shm


def test_shared_memory_defaults_to_half_the_memory_limit() -> None:
    def shm(resources: dict[str, str]) -> str:
        return spec.parse_spec({"dataset": {"path": "d"}, "resources": resources}).resources.shared_memory

    assert shm({}) == "8Gi"  # memory's default is 16Gi
    assert shm({"memory": "2Gi"}) == "1Gi" and shm({"memory": "1Gi"}) == "512Mi"
    assert shm({"memory": "2e9"}) == "1G" and shm({"memory": "1001"}) == "500"
    assert shm({"memory": "2Gi", "sharedMemory": "256Mi"}) == "256Mi"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("1.5Gi", 3 * 2**29),
        ("500M", 500_000_000),
        ("2e9", 2_000_000_000),
        ("128974848", 128974848),
        ("1E", 10**18),
        ("250m", 0.25),
        ("12Ki", 12 * 1024),
    ],
)
def test_quantities_parse_like_kubernetes(text: str, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "Gi", "1..5Gi", "4Qi", "1e", "--1"])
def test_non_quantities_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="quantit"):
        parse_quantity(text)


def test_byte_counts_format_as_the_shortest_exact_quantity() -> None:
    assert [format_bytes(n) for n in (8 * 2**30, 3 * 2**29, 1_500_000_000, 1000, 1001, 0)] == [
        "8Gi",
        "1536Mi",
        "1500M",
        "1k",
        "1001",
        "0",
    ]
