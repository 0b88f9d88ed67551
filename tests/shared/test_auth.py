"""Partner keys are issued by ingestion, stored hashed, verified by every service, and revocable."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from services.ingestion.models import ApiKey
from shared.auth import KeyVerifier, Principal, hash_api_key, hash_internal_token
from shared.errors import Unauthorized
from tests.conftest import INTERNAL_TOKEN
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


# -- scopes, expiry, rotation, last use, the hashed internal token ---------------------------------------------


def issue_key(client, partner_id: str, **body) -> dict:
    response = client.post(f"/v1/partners/{partner_id}/keys", json=body, headers=INTERNAL)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_a_predict_scoped_key_cannot_push_and_the_refusal_names_the_scope(platform) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, issued["api_key"])
    predict_only = issue_key(ingestion.client, issued["partner"]["id"], scopes=["predict"])
    assert predict_only["key"]["scopes"] == ["predict"]

    push = ingestion.client.post(
        f"/v1/datasets/{dataset['id']}/items", json={"items": [{"text": "x"}]}, headers=bearer(predict_only["api_key"])
    )
    assert push.status_code == 403
    error = push.get_json()["error"]
    assert error["code"] == "missing_scope" and "'push'" in error["message"]
    assert error["details"]["missing_scope"] == "push" and error["details"]["key_scopes"] == ["predict"]
    items = ingestion.client.get(f"/v1/datasets/{dataset['id']}/items", headers=bearer(issued["api_key"])).get_json()
    assert items["items"] == [], "nothing was stored"
    # The same key is accepted where its scope is what the route needs: inference answers 404 (no such model),
    # not 403; and another service refuses what the key lacks, so the scopes travelled through verification.
    inference = platform("inference")
    predicted = inference.client.post(
        "/v1/models/nothing:predict", json={"texts": ["hi"]}, headers=bearer(predict_only["api_key"])
    )
    assert predicted.status_code == 404, predicted.get_json()
    labeling = platform("labeling")
    read = labeling.client.get(f"/v1/datasets/{dataset['id']}/tasks", headers=bearer(predict_only["api_key"]))
    assert read.status_code == 403 and read.get_json()["error"]["details"]["missing_scope"] == "read"


def test_scopes_are_validated_when_a_key_is_issued(platform) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    url = f"/v1/partners/{issued['partner']['id']}/keys"
    unknown = ingestion.client.post(url, json={"scopes": ["push", "root"]}, headers=INTERNAL)
    assert unknown.status_code == 422 and "scopes" in unknown.get_json()["error"]["details"]["fields"]["json"]
    assert ingestion.client.post(url, json={"scopes": []}, headers=INTERNAL).status_code == 422
    past = ingestion.client.post(url, json={"expires_at": "2020-01-01T00:00:00+00:00"}, headers=INTERNAL)
    assert past.status_code == 422
    assert issued["key"]["scopes"] == ["push", "label", "predict", "read", "admin"], "a new partner's key has all"


def test_an_expired_key_is_refused_saying_so_everywhere(platform) -> None:
    ingestion = platform("ingestion")
    labeling = platform("labeling")
    issued = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, issued["api_key"])
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    short = issue_key(ingestion.client, issued["partner"]["id"], expires_at=expires.isoformat())
    headers = bearer(short["api_key"])
    assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=headers).status_code == 200
    assert labeling.client.get(f"/v1/datasets/{dataset['id']}/tasks", headers=headers).status_code == 404
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
    for client, path in (
        (ingestion.client, f"/v1/datasets/{dataset['id']}"),
        (labeling.client, "/v1/datasets/x/tasks"),
    ):
        refused = client.get(path, headers=headers)
        assert refused.status_code == 401, refused.get_json()
        error = refused.get_json()["error"]
        assert error["code"] == "key_expired" and "expired" in error["message"]
    assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(issued["api_key"])).status_code == 200


def test_rotation_keeps_both_keys_live_for_the_grace_period_then_only_the_new_one(platform) -> None:
    ingestion = platform("ingestion")
    labeling = platform("labeling")
    issued = create_partner(ingestion.client)
    partner_id = issued["partner"]["id"]
    old = issue_key(ingestion.client, partner_id, scopes=["read", "push"])
    dataset = create_dataset(ingestion.client, issued["api_key"])
    path = f"/v1/datasets/{dataset['id']}/tasks"
    assert labeling.client.get(path, headers=bearer(old["api_key"])).status_code == 404  # cached by labeling now

    new = issue_key(ingestion.client, partner_id, replaces=old["key"]["id"], grace_seconds=2)
    assert new["key"]["scopes"] == ["push", "read"], "a replacement inherits the old key's scopes"
    assert new["key"]["replaces"] == old["key"]["id"]
    for key in (old["api_key"], new["api_key"]):
        assert labeling.client.get(path, headers=bearer(key)).status_code == 404, "both live during the grace"
        assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(key)).status_code == 200
    listed = {
        k["id"]: k for k in ingestion.client.get(f"/v1/partners/{partner_id}/keys", headers=INTERNAL).get_json()["keys"]
    }
    assert listed[old["key"]["id"]]["expires_at"] and listed[new["key"]["id"]]["expires_at"] is None
    eventually(
        lambda: labeling.client.get(path, headers=bearer(old["api_key"])).status_code == 401,
        timeout=2 + labeling.runtime.settings.key_cache_seconds + 2,
        what="the old key to expire after its grace",
    )
    assert ingestion.client.get(f"/v1/datasets/{dataset['id']}", headers=bearer(old["api_key"])).status_code == 401
    assert labeling.client.get(path, headers=bearer(new["api_key"])).status_code == 404
    again = ingestion.client.post(
        f"/v1/partners/{partner_id}/keys", json={"replaces": old["key"]["id"]}, headers=INTERNAL
    )
    assert again.status_code == 409, "an expired key cannot be rotated again"
    unknown = ingestion.client.post(f"/v1/partners/{partner_id}/keys", json={"replaces": "key_nope"}, headers=INTERNAL)
    assert unknown.status_code == 404


def test_last_use_is_recorded_at_most_once_a_minute_per_key(platform) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    partner_id = issued["partner"]["id"]

    def last_used() -> str | None:
        keys = ingestion.client.get(f"/v1/partners/{partner_id}/keys", headers=INTERNAL).get_json()["keys"]
        return keys[0]["last_used_at"]

    assert last_used() is None
    started = datetime.now(UTC)
    assert ingestion.client.get("/v1/datasets", headers=bearer(issued["api_key"])).status_code == 200
    first = last_used()
    assert first is not None and datetime.fromisoformat(first) >= started - timedelta(seconds=1)
    # Every other service's cache miss is a key check at ingestion; many of them within the minute write nothing.
    key_hash = hash_api_key(issued["api_key"])
    for _ in range(5):
        checked = ingestion.client.post("/v1/internal/keys/verify", json={"key_hash": key_hash}, headers=INTERNAL)
        assert checked.status_code == 200 and checked.get_json()["scopes"] == sorted(issued["key"]["scopes"])
    assert last_used() == first


def test_keys_from_before_scopes_keep_working_with_every_scope(platform, settings) -> None:
    """A database an older release created (api_keys without the new columns) gains them on start; its keys
    have every scope and no expiry."""
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, issued["api_key"])
    ingestion.stop()
    ingestion.runtime.close()
    database = settings.home / "db" / "ingestion.sqlite3"
    with sqlite3.connect(database) as conn:
        for column in ("scopes", "expires_at", "last_used_at", "replaces"):
            conn.execute(f"ALTER TABLE api_keys DROP COLUMN {column}")
    upgraded = platform("ingestion")
    headers = bearer(issued["api_key"])
    assert upgraded.client.get(f"/v1/datasets/{dataset['id']}", headers=headers).status_code == 200
    pushed = upgraded.client.post(
        f"/v1/datasets/{dataset['id']}/items", json={"items": [{"text": "x"}]}, headers=headers
    )
    assert pushed.status_code == 200
    keys = upgraded.client.get(f"/v1/partners/{issued['partner']['id']}/keys", headers=INTERNAL).get_json()["keys"]
    assert keys[0]["scopes"] == ["push", "label", "predict", "read", "admin"] and keys[0]["expires_at"] is None


def test_services_check_the_internal_token_against_its_hash(platform) -> None:
    """Configuration may hold only the token's SHA-256: the service compares digests, never the token."""
    ingestion = platform("ingestion", internal_token="", internal_token_sha256=hash_internal_token(INTERNAL_TOKEN))
    assert ingestion.client.get("/v1/partners", headers=INTERNAL).status_code == 200
    assert ingestion.client.get("/v1/partners", headers=bearer("not-the-token")).status_code == 401
    assert ingestion.client.get("/v1/partners", headers=bearer(hash_internal_token(INTERNAL_TOKEN))).status_code == 401
