"""Fuzz every documented operation with schemathesis (bounded examples): no input causes a server error.

Checks: no 5xx other than the documented 429/503 load answers, and every status code is one the schema
documents. Traffic goes only to the test server on 127.0.0.1.
"""

from __future__ import annotations

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

EXAMPLES_PER_OPERATION = 15


def test_no_generated_request_causes_a_server_error(server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/count", "POST /v1/segment", "POST /v2/models/{name}/infer"} <= labels
    exercised: list[str] = []
    with requests.Session() as session:
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=server.url, session=session, timeout=60)
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

            check()
            exercised.append(operation.label)
    assert len(exercised) == len(operations)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
