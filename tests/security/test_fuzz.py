"""Untrusted input fuzzed from each service's OpenAPI document: never a 5xx, and every answer is one the document
describes (its status, its content type, its body, its headers).

schemathesis generates requests from every operation's schema (valid and invalid: wrong types, missing fields,
odd strings) and sends them in-process to the service's WSGI app, once with a partner key and once with the
internal token; each answer is validated against the document by schemathesis's own conformance checks. The
partner owns a dataset with pushed items, so list operations answer records, not only empty pages. Bounded: a
few examples per operation and a time budget per service, so the file stays near a minute.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.settings import SERVICES
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import bearer, create_dataset, create_partner

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES_PER_OPERATION = 10
BUDGET_SECONDS_PER_SERVICE = 20


@schemathesis.serializer("application/x-ndjson", "application/zip", "application/octet-stream")
def _raw_bytes(_ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """Upload bodies are files: send whatever was generated as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


def fuzz(operation: schemathesis.APIOperation, token: str, failures: list[str]) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        case.headers = headers
        response = case.call()
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {failure.title}: "
                    f"{failure.message[:300]} | body: {response.text[:200]}"
                )

    check()


@pytest.mark.parametrize("service", SERVICES)
def test_fuzzed_requests_get_only_documented_answers(platform, service: str) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client, "fuzzer")
    dataset = create_dataset(ingestion.client, issued["api_key"])
    pushed = ingestion.client.post(
        f"/v1/datasets/{dataset['id']}/items",
        json={"items": [{"text": "a wonderful film", "label": "pos"}, {"text": "two hours lost"}]},
        headers=bearer(issued["api_key"]),
    )
    assert pushed.status_code == 200, pushed.get_json()
    target = ingestion if service == "ingestion" else platform(service)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", target.app)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{service} documents no operations"
    started = time.monotonic()
    for token in (issued["api_key"], INTERNAL_TOKEN):
        for operation in operations:
            if time.monotonic() - started > BUDGET_SECONDS_PER_SERVICE:
                break
            fuzz(operation, token, failures)
    assert not failures, f"{len(set(failures))} answers the document does not describe:\n" + "\n".join(
        sorted(set(failures))[:25]
    )
