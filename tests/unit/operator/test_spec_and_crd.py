"""The typed spec, the generated CRD and the trainer-schema file agree with their sources."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from fieldkube.operator import crd, rules, spec
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
    from fieldkube.contract.config import BUILTIN_MODELS

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
    assert {
        "rule": "self == oldSelf",
        "message": "spec.model is immutable once the job exists (the operator reads it only at creation)",
    } in props["model"]["x-kubernetes-validations"]
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
        ({"resources": {"cpu": "0"}}, "resources.cpu"),
        ({"resources": {"cpu": "two"}}, "resources.cpu"),
        ({"model": {"initFrom": "models:/fieldkube-counter"}}, "model.initFrom"),
        ({"model": {"initFrom": "runs:/abc"}}, "model.initFrom"),
        ({"model": {"initFrom": ""}}, "model.initFrom"),
        ({"model": {"freeze": ["encoder", "encoder"]}}, "model.freeze"),
        ({"model": {"freeze": ["encoder.conv1"]}}, "model.freeze"),
        ({"model": {"freezeEpochs": 0, "freeze": ["encoder"]}}, "model.freezeEpochs"),
        ({"model": {"freezeEpochs": 3}}, "model"),
        ({"diagnostics": {"logTailLines": 0}}, "diagnostics.logTailLines"),
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
    assert shm["type"] == "string" and "isQuantity(self)" in shm["x-kubernetes-validations"][0]["rule"]
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


def _root() -> dict[str, Any]:
    schema: dict[str, Any] = crd.trainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _rules(node: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = node.get("x-kubernetes-validations", [])
    return rules


@pytest.mark.parametrize(
    ("name", "valid"),
    [("flowers", True), ("a1-b2", True), ("1job", False), ("a.b", False), ("job-", False), ("Job", False)],
)
def test_the_name_rule_is_a_dns_1035_label(name: str, valid: bool) -> None:
    rule = next(r for r in _rules(_root()) if "matches" in r["rule"])
    assert "metadata.name must be a DNS-1035 label" in rule["message"]
    pattern = rule["rule"].split("matches('", 1)[1].rsplit("')", 1)[0]
    assert pattern == rules.DNS_1035_LABEL_PATTERN
    assert bool(re.fullmatch(pattern, name)) is valid
    assert any(r["rule"] == f"self.metadata.name.size() <= {spec.MAX_NAME_LENGTH}" for r in _rules(_root()))


IMMUTABLE = [
    "model",
    "dataset",
    "training",
    "workers",
    "gpusPerWorker",
    "resources",
    "image",
    "imagePullPolicy",
    "mlflow",
    "checkpoint",
    "scheduling",
    "podMetadata",
]
MUTABLE = ["pendingTimeoutSeconds", "diagnostics", "runPolicy"]


def test_every_field_read_only_at_creation_is_immutable_and_the_rest_are_not() -> None:
    props = _root()["properties"]["spec"]["properties"]
    assert set(IMMUTABLE) | set(MUTABLE) == set(props), "a new spec field: decide whether it may change"
    for field in IMMUTABLE:
        message = f"spec.{field} is immutable once the job exists (the operator reads it only at creation)"
        assert {"rule": "self == oldSelf", "message": message} in _rules(props[field]), field
    for field in MUTABLE:
        assert not any(r["rule"] == "self == oldSelf" for r in _rules(props[field])), field
    run_policy = props["runPolicy"]["properties"]
    for field in ("backoffLimit", "cleanPodPolicy"):
        assert _rules(run_policy[field])[0]["rule"] == "self == oldSelf", field
    for field in ("suspend", "ttlSecondsAfterFinished"):
        assert not _rules(run_policy[field]), field
    deadline = next(r for r in _rules(props["runPolicy"]) if "activeDeadlineSeconds" in r["rule"])
    assert (
        deadline["fieldPath"] == ".activeDeadlineSeconds"
        and "has(oldSelf.activeDeadlineSeconds)" in deadline["rule"]
    )


def test_a_global_batch_must_divide_by_the_training_processes() -> None:
    rule = next(r for r in _rules(_root()["properties"]["spec"]) if "batch_size" in r["rule"])
    assert rule["fieldPath"] == ".training.train.batch_size"
    assert "batch_mode == 'global'" in rule["rule"] and "has(self.training.train)" in rule["rule"]
    assert "% (self.workers * (self.gpusPerWorker > 0 ? self.gpusPerWorker : 1)) == 0" in rule["rule"]
    assert rule["message"].startswith("spec.training.train.batch_size") and "messageExpression" not in rule


def test_resource_quantities_are_checked_by_the_api_servers_quantity_parser() -> None:
    resources = _root()["properties"]["spec"]["properties"]["resources"]["properties"]
    for field in ("cpu", "memory", "sharedMemory"):
        node = resources[field]
        assert "pattern" not in node and node["maxLength"] == rules.MAX_QUANTITY_LENGTH
        (rule,) = _rules(node)
        assert rule["rule"] == "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))"
        assert rule["message"].startswith(f"spec.resources.{field} must be a positive Kubernetes quantity")


def test_model_carries_the_fine_tuning_fields_with_their_rules() -> None:
    model = _root()["properties"]["spec"]["properties"]["model"]
    props = model["properties"]
    assert props["initFrom"]["type"] == "string" and "default" not in props["initFrom"]
    assert any("models:/" in r["rule"] for r in _rules(props["initFrom"]))
    assert props["freeze"]["x-kubernetes-list-type"] == "set"
    assert props["freeze"]["items"]["pattern"] == rules.LAYER_GROUP_PATTERN
    assert (props["freezeEpochs"]["minimum"], props["freezeEpochs"]["maximum"]) == (
        1,
        rules.MAX_FREEZE_EPOCHS,
    )
    assert any(r.get("fieldPath") == ".freezeEpochs" for r in _rules(model))
    parsed = spec.parse_spec(
        {
            "dataset": {"path": "d"},
            "model": {
                "initFrom": "models:/fieldkube-counter@champion",
                "freeze": ["columns"],
                "freezeEpochs": 2,
            },
        }
    ).model
    assert (parsed.initFrom, parsed.freeze, parsed.freezeEpochs) == (
        "models:/fieldkube-counter@champion",
        ["columns"],
        2,
    )


def test_log_tails_are_opt_in() -> None:
    diagnostics = _root()["properties"]["spec"]["properties"]["diagnostics"]["properties"]
    assert diagnostics["logTail"]["default"] is False
    parsed = spec.parse_spec({"dataset": {"path": "d"}})
    assert parsed.diagnostics.logTail is False and parsed.diagnostics.logTailLines == 20


def test_status_conditions_follow_the_api_conventions() -> None:
    conditions = _root()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == [
        "type"
    ]
    item = conditions["items"]
    assert "type" in item["required"] and "reason" in item["required"]
    assert item["properties"]["reason"]["minLength"] == 1
    assert item["properties"]["observedGeneration"]["type"] == "integer"


def test_a_models_own_cel_rules_survive_the_rules_its_field_adds() -> None:
    own, added = {"rule": "size(self.a) > 0", "message": "a"}, {"rule": "self == oldSelf", "message": "b"}
    source = {
        "type": "object",
        "properties": {"d": {"$ref": "#/$defs/D", "x-kubernetes-validations": [added]}},
        "$defs": {
            "D": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "x-kubernetes-validations": [own],
            }
        },
    }
    assert structural_schema(source)["properties"]["d"]["x-kubernetes-validations"] == [own, added]


@pytest.mark.parametrize(
    "uri",
    [
        "models:/c@champion",
        "models:/c/3",
        "models:/c/3/",
        "models:/c",
        "models:/c@",
        "models:/a/b@c",
        "models:/c/x",
    ],
)
def test_init_from_is_judged_like_the_trainer_judges_model_init_from(uri: str) -> None:
    from fieldkube.contract.config import ModelConfig

    def accepted(check: Any) -> bool:
        try:
            check()
        except (ValueError, ValidationError):
            return False
        return True

    trainer = accepted(lambda: ModelConfig(init_from=uri))
    assert (
        accepted(lambda: spec.parse_spec({"dataset": {"path": "d"}, "model": {"initFrom": uri}})) == trainer
    )
    assert bool(re.fullmatch(rules.MODELS_URI_PATTERN, uri)) == trainer
