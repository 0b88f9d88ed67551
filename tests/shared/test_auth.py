"""Partner keys are issued by ingestion, stored hashed, verified by every service, and revocable."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from services.ingestion.models import ApiKey
from shared.auth import KeyVerifier, Principal, hash_api_key
from shared.errors import Unauthorized
from tests.helpers import INTERNAL, bearer, create_dataset, create_partner, eventually


def test_keys_are_shown_once_and_stored_hashed(platform) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client, "acme")
    secret = issued["api_key"]
    assert secret.startswith("fwk_") and len(secret) > 40
    with ingestion.runtime.db.session() as session:
        stored = session.scalars(select(ApiKey)).all()
    assert [key.key_hash for key in stored] == [hash_api_key(secret)]
    assert all(secret not in str(value) for key in stored for value in vars(key).values())
    listed = ingestion.client.get(f"/v1/partners/{issued['partner']['id']}/keys", headers=INTERNAL).get_json()
    assert "api_key" not in listed["keys"][0]
    assert listed["keys"][0]["prefix"] == secret[:10]


def test_partner_administration_needs_the_internal_token(platform) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    assert ingestion.client.post("/v1/partners", json={"name": "x"}).status_code == 401
    as_partner = ingestion.client.post("/v1/partners", json={"name": "x"}, headers=bearer(issued["api_key"]))
    assert as_partner.status_code == 401
    assert ingestion.client.post("/v1/partners", json={"name": "acme"}, headers=INTERNAL).status_code == 409


def test_another_service_verifies_keys_through_ingestion_and_revocation_propagates(platform) -> None:
    ingestion = platform("ingestion")
    labeling = platform("labeling")  # verifies over HTTP against the served ingestion, cache TTL 1 s
    issued = create_partner(ingestion.client)
    key = issued["api_key"]
    dataset = create_dataset(ingestion.client, key)
    # labeling has not seen the dataset yet (no worker here), but the key is accepted: 404, not 401.
    seen = labeling.client.get(f"/v1/datasets/{dataset['id']}/tasks", headers=bearer(key))
    assert seen.status_code == 404, seen.get_json()
    assert labeling.client.get("/v1/datasets/x/tasks", headers=bearer("fwk_" + "x" * 43)).status_code == 401
    assert labeling.client.get("/v1/datasets/x/tasks").status_code == 401

    revoked = ingestion.client.delete(
        f"/v1/partners/{issued['partner']['id']}/keys/{issued['key']['id']}", headers=INTERNAL
    )
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(key)).status_code == 401
    started = time.monotonic()
    eventually(
        lambda: labeling.client.get(f"/v1/datasets/{dataset['id']}/tasks", headers=bearer(key)).status_code == 401,
        timeout=5,
        what="labeling to refuse the revoked key",
    )
    assert time.monotonic() - started <= labeling.runtime.settings.key_cache_seconds + 1


def test_the_key_check_carries_the_callers_trace_id_to_ingestion(platform, logs) -> None:
    """The trace id a partner's request came with is the one ingestion logs for the key check it causes."""
    ingestion = platform("ingestion")
    labeling = platform("labeling")
    issued = create_partner(ingestion.client)
    headers = bearer(issued["api_key"]) | {"X-Request-ID": "trace-of-the-partner-request"}
    assert labeling.client.get("/v1/datasets/x/tasks", headers=headers).status_code == 404
    checks = logs.find(event="http_request", service="ingestion", path="/v1/internal/keys/verify")
    assert [line["trace_id"] for line in checks] == ["trace-of-the-partner-request"]


def test_verified_keys_are_cached_for_the_ttl_and_unknown_ones_briefly() -> None:
    asked: list[str] = []
    known = {hash_api_key("fwk_known"): Principal(tenant="acme", key_id="key_1")}

    def lookup(key_hash: str) -> Principal | None:
        asked.append(key_hash)
        return known.get(key_hash)

    verifier = KeyVerifier(lookup, ttl_seconds=0.3)
    assert verifier.verify("fwk_known") == verifier.verify("fwk_known") == Principal(tenant="acme", key_id="key_1")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.verify("fwk_unknown")
    assert len(asked) == 2, "one lookup per key while cached"
    verifier.forget(hash_api_key("fwk_known"))
    verifier.verify("fwk_known")
    assert len(asked) == 3, "a forgotten key is looked up again"
    time.sleep(0.35)
    verifier.verify("fwk_known")
    with pytest.raises(Unauthorized):
        verifier.verify("fwk_unknown")
    assert len(asked) == 5, "both answers expire with the TTL"


def test_rotated_key_works_alongside_until_the_old_one_is_revoked(platform) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    partner_id = issued["partner"]["id"]
    rotated = ingestion.client.post(f"/v1/partners/{partner_id}/keys", headers=INTERNAL).get_json()
    dataset = create_dataset(ingestion.client, rotated["api_key"])
    for key in (issued["api_key"], rotated["api_key"]):
        assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(key)).status_code == 200


def test_another_tenants_dataset_answers_404(platform) -> None:
    ingestion = platform("ingestion")
    alice = create_partner(ingestion.client, "alice")
    bob = create_partner(ingestion.client, "bob")
    dataset = create_dataset(ingestion.client, alice["api_key"])
    response = ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(bob["api_key"]))
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    push = ingestion.client.post(
        f"/v1/datasets/{dataset['id']}/items", json={"items": [{"text": "x"}]}, headers=bearer(bob["api_key"])
    )
    assert push.status_code == 404
