"""Untrusted input fuzzed from each service's OpenAPI document: never a 5xx, never a crash.

schemathesis generates requests from every operation's schema (valid and invalid: wrong types, missing
fields, odd strings) and sends them in-process to the service's WSGI app, once with a partner key and once
with the internal token. Bounded: a few examples per operation, a time budget per service.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from shared.settings import SERVICES
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import create_dataset, create_partner

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@schemathesis.serializer("application/x-ndjson", "application/zip", "application/octet-stream")
def _raw_bytes(_ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """Upload bodies are files: send whatever was generated as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


EXAMPLES_PER_OPERATION = 6
BUDGET_SECONDS_PER_SERVICE = 40


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
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = case.call()
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

    check()


@pytest.mark.parametrize("service", SERVICES)
def test_fuzzed_requests_never_get_a_5xx(platform, service: str) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client, "fuzzer")
    create_dataset(ingestion.client, issued["api_key"])
    target = ingestion if service == "ingestion" else platform(service)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", target.app)
    failures: list[str] = []
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{service} documents no operations"
    for token in (issued["api_key"], INTERNAL_TOKEN):
        for operation in operations:
            if time.monotonic() - started > BUDGET_SECONDS_PER_SERVICE:
                break
            fuzz(operation, token, failures)
    assert not failures, "\n".join(sorted(set(failures))[:20])
