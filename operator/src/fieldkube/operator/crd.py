"""Generate the TrainingJob CustomResourceDefinition from the typed spec and status models (never by hand)."""

from __future__ import annotations

from typing import Any

import yaml

from fieldkube.operator import spec as spec_module
from fieldkube.operator.openapi import structural_schema
from fieldkube.operator.spec import DNS_1035_LABEL_PATTERN, MAX_NAME_LENGTH, TrainingJobSpec
from fieldkube.operator.status_model import TrainingJobStatus
from fieldkube.operator.training_schema import training_schema

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.workers"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

NAME_RULES = [
    {
        "rule": f"self.metadata.name.matches('{DNS_1035_LABEL_PATTERN}')",
        "message": "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with "
        "a letter and ending with a letter or digit (the MPIJob's Services are named after it)",
    },
    {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (worker pods are named "
        "<name>-worker-<index>)",
    },
]


def spec_schema() -> dict[str, Any]:
    """OpenAPI schema of `spec`, with the trainer's schema embedded at `spec.training`."""
    schema = structural_schema(TrainingJobSpec.model_json_schema(by_alias=True))
    training = schema["properties"]["training"]
    embedded = {k: v for k, v in training_schema().items() if k != "description"}
    schema["properties"]["training"] = {
        **embedded,
        "description": training["description"],
        "default": {},
        "x-kubernetes-validations": training["x-kubernetes-validations"],
    }
    schema.pop("description", None)
    return schema


def status_schema() -> dict[str, Any]:
    schema = structural_schema(TrainingJobStatus.model_json_schema())
    for child in schema["properties"].values():
        child.pop("default", None)
    schema.pop("description", None)
    return schema


def trainingjob_crd() -> dict[str, Any]:
    root = {
        "type": "object",
        "required": ["spec"],
        "x-kubernetes-validations": NAME_RULES,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{spec_module.PLURAL}.{spec_module.GROUP}"},
        "spec": {
            "group": spec_module.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec_module.KIND,
                "listKind": f"{spec_module.KIND}List",
                "plural": spec_module.PLURAL,
                "singular": spec_module.SINGULAR,
                "shortNames": list(spec_module.SHORT_NAMES),
                "categories": ["fieldkube"],
            },
            "versions": [
                {
                    "name": spec_module.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering: lets two operator replicas agree that only one is active."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crds() -> str:
    """The YAML checked in as manifests/crd/trainingjobs.yaml."""
    header = "# Generated by `fieldkube-operator crd` from fieldkube.operator.spec: do not edit by hand.\n"
    docs = [trainingjob_crd(), peering_crd()]
    return header + yaml.safe_dump_all(docs, sort_keys=False, width=120)
