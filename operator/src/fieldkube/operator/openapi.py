"""Turn a pydantic JSON schema into a Kubernetes structural OpenAPI v3 schema (what a CRD accepts).

Kubernetes forbids `$ref`, `anyOf` with null, `title`, `additionalProperties: false` beside `properties`
and JSON-Schema-2020 numeric `exclusiveMinimum`; it wants `x-kubernetes-preserve-unknown-fields` for free-form
maps. Objects with properties and no default get `default: {}` so that the API server fills nested defaults.
"""

from __future__ import annotations

import copy
from typing import Any

_DROPPED_KEYS = {"title", "$defs"}
_CEL_KEY = "x-kubernetes-validations"


def inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every `{"$ref": "#/$defs/X"}` by a copy of X (merged with sibling keys).

    CEL rules of both are kept: a model's own rules, then those its field adds (e.g. immutability).
    """
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            rules = [*target.get(_CEL_KEY, []), *node.get(_CEL_KEY, [])]
            if rules:
                merged[_CEL_KEY] = rules
            return inline_refs(merged, defs)
        return {k: inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [inline_refs(v, defs) for v in node]
    return node


def _strip_null(node: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` (an Optional field) becomes X; a null default is dropped."""
    options = node.get("anyOf")
    if isinstance(options, list):
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1 and len(non_null) < len(options):
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**non_null[0], **rest}
    if "default" in node and node["default"] is None:
        node = {k: v for k, v in node.items() if k != "default"}
    return node


def structural(node: Any) -> Any:
    """Convert one (already ref-inlined) JSON schema node to a structural schema node."""
    if not isinstance(node, dict):
        return node
    node = _strip_null(node)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: structural(child) for name, child in value.items()}
        elif key == "items":
            out[key] = structural(value)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = structural(value)
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out:
        additional = out.get("additionalProperties")
        if not additional:
            out.pop("additionalProperties", None)
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in out:
        required = set(out.get("required", []))
        for name, child in out["properties"].items():
            wants_default = child.get("type") == "object" and "properties" in child
            if wants_default and "default" not in child and name not in required:
                child["default"] = {}
    if "type" not in out and "enum" in out and all(isinstance(v, str) for v in out["enum"]):
        out["type"] = "string"
    return out


def structural_schema(json_schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic `model_json_schema()` result as a CRD-ready structural schema."""
    inlined = inline_refs(json_schema, json_schema.get("$defs", {}))
    result: dict[str, Any] = structural(inlined)
    return result


def remove_paths(schema: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """A copy of an object schema without the dotted property paths given (e.g. 'data.path')."""
    result = copy.deepcopy(schema)
    for path in paths:
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            node = node["properties"][part]
        node["properties"].pop(leaf)
        if leaf in node.get("required", []):
            node["required"] = [r for r in node["required"] if r != leaf]
    return result


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill defaults the way the API server does: missing properties with a default, recursively."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    filled = dict(value)
    for name, child in schema["properties"].items():
        if name not in filled and "default" in child:
            filled[name] = child["default"]
        if name in filled:
            filled[name] = apply_defaults(child, filled[name])
    return filled
