"""Fuzz every documented operation with schemathesis (bounded examples): no input causes a server error.

Each operation is fuzzed with data that fits the schema and with data that breaks it; operations on a
`{name}` are fuzzed with random names (404) and with the served models' names, so requests reach the
request parsing and the models. Checks: no 5xx at all (this server is never overloaded, so not even the
documented 429/503 load answers may appear), and every status code is one the schema documents.
Traffic goes only to the test server on 127.0.0.1.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

EXAMPLES_PER_VARIANT = 12
MODEL_NAMES = ("counter", "segmenter-unet")


def _variants(operation: Any) -> list[tuple[GenerationMode, dict[str, str]]]:
    """(mode, fixed path parameters) pairs to fuzz an operation with.

    Only POST operations have something to break (query parameters, a body); the GET ones take nothing
    but path strings, which any value satisfies.
    """
    modes = [GenerationMode.POSITIVE]
    if operation.method.upper() == "POST":
        modes.append(GenerationMode.NEGATIVE)
    names: list[dict[str, str]] = [{}]
    if "{name}" in operation.path:
        names += [{"name": name} for name in MODEL_NAMES]
    return [(mode, fixed) for mode in modes for fixed in names]


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    path_parameters: dict[str, str],
    base_url: str,
    session: requests.Session,
    statuses: Counter[int],
) -> int:
    """Send one variant's generated requests and check each response; returns how many were sent."""
    sent = 0

    @given(case=operation.as_strategy(mode, path_parameters=path_parameters or None))
    @settings(
        max_examples=EXAMPLES_PER_VARIANT,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        nonlocal sent
        response = case.call(base_url=base_url, session=session, timeout=60)
        statuses[response.status_code] += 1
        sent += 1
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

    check()
    return sent


def test_no_generated_request_causes_a_server_error(server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/count", "POST /v1/segment", "POST /v2/models/{name}/infer"} <= labels
    statuses: Counter[int] = Counter()
    exercised: Counter[str] = Counter()
    with requests.Session() as session:
        for operation in operations:
            for mode, path_parameters in _variants(operation):
                sent = _fuzz(operation, mode, path_parameters, server.url, session, statuses)
                exercised[f"{mode} {operation.label}"] += sent
    print(f"schemathesis: {sum(statuses.values())} requests over {len(operations)} operations: {statuses}")
    assert all(exercised.values())
    assert {f"positive {label}" for label in labels} <= set(exercised)
    assert {
        "negative POST /v1/count",
        "negative POST /v1/segment",
        "negative POST /v2/models/{name}/infer",
    } <= set(exercised)
    assert {200, 400, 404, 415, 422} <= set(statuses)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
