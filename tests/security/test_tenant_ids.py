"""A tenant id named by a caller (the internal token acting for a tenant) is checked at the API boundary.

The fuzz suite once sent `POST /v1/runs` a tenant holding a control character: it reached an object key, the
S3 endpoint's XML answer could not carry it, and the SDK's parse error became a 500. Every place that takes a
tenant from the caller now answers 4xx for one that is not an id, before any query or object key is built.
"""

from __future__ import annotations

import pytest

from tests.helpers import INTERNAL

BAD_TENANTS = ["ptn\x01abc", "ptn_1\n", "a b", "../ptn_1", "ptn_1/x", "-leading-dash", "x" * 65, "ptn_é"]


@pytest.mark.parametrize("tenant", BAD_TENANTS)
def test_a_tenant_that_is_not_an_id_is_refused_everywhere_it_is_named(platform, tenant: str) -> None:
    training, registry, labeling, inference = (platform(s) for s in ("training", "registry", "labeling", "inference"))
    run = {"tenant": tenant, "dataset_id": "ds_1", "snapshot_id": "snap_1"}
    answers = {
        "POST /v1/runs": training.client.post("/v1/runs", json=run, headers=INTERNAL),
        "GET /v1/runs": training.client.get("/v1/runs", query_string={"tenant": tenant}, headers=INTERNAL),
        "GET /v1/models": registry.client.get("/v1/models", query_string={"tenant": tenant}, headers=INTERNAL),
        "POST /v1/annotators": labeling.client.post(
            "/v1/annotators", json={"tenant": tenant, "name": "ann", "datasets": ["ds_1"]}, headers=INTERNAL
        ),
    }
    if "\n" not in tenant:  # a header cannot carry a newline at all
        answers["predict on behalf of"] = inference.client.post(
            "/v1/models/m:predict", json={"texts": ["hello"]}, headers={**INTERNAL, "X-Flywheel-Tenant": tenant}
        )
    for what, response in answers.items():
        assert response.status_code in (400, 422), f"{what} with tenant {tenant!r}: {response.status_code}"
        body = response.get_json()
        assert "tenant" in str(body).lower(), f"{what}: the error should name the tenant: {body}"


def test_partner_ids_are_tenant_ids(platform) -> None:
    """The ids ingestion gives partners pass the check that guards the other services."""
    from tests.helpers import create_partner

    ingestion, registry = platform("ingestion"), platform("registry")
    partner = create_partner(ingestion.client, "acme")["partner"]["id"]
    listed = registry.client.get("/v1/models", query_string={"tenant": partner}, headers=INTERNAL)
    assert listed.status_code == 200, listed.get_json()
