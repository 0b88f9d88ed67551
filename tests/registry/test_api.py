"""The registry's API: tenant isolation, listing and filters, compare, download URLs, the serving contract."""

from __future__ import annotations

import hashlib

import pytest
import requests

from tests.helpers import INTERNAL, bearer, create_partner
from tests.registry.evaluations import balanced
from tests.registry.support import RunFactory, deliver, outbox, put_alias

pytestmark = pytest.mark.timeout(60)

TENANT = "ptn_registry_api"


def test_partners_see_only_their_own_models_and_operator_actions_need_the_internal_token(platform) -> None:
    ingestion = platform("ingestion")
    registry = platform("registry")  # verifies partner keys through the served ingestion
    alice, bob = create_partner(ingestion.client, "alice"), create_partner(ingestion.client, "bob")
    alice_tenant, bob_tenant = alice["partner"]["id"], bob["partner"]["id"]
    runs = RunFactory(registry.runtime.storage)
    deliver(registry.runtime, alice_tenant, runs(alice_tenant, "shared-name", macro_f1=0.7))
    deliver(registry.runtime, alice_tenant, runs(alice_tenant, "alice-only"))
    deliver(registry.runtime, bob_tenant, runs(bob_tenant, "shared-name", macro_f1=0.9))
    as_alice, as_bob = bearer(alice["api_key"]), bearer(bob["api_key"])

    listed = registry.client.get("/v1/models", headers=as_alice).get_json()
    assert sorted(m["name"] for m in listed["models"]) == ["alice-only", "shared-name"]
    assert {m["tenant"] for m in listed["models"]} == {alice_tenant}
    own = registry.client.get("/v1/models/shared-name/versions/1", headers=as_bob).get_json()
    assert own["metrics"]["macro_f1"] == 0.9  # bob's model of the same name, not alice's

    for path in (
        "/v1/models/alice-only",
        "/v1/models/alice-only/versions",
        "/v1/models/alice-only/versions/1",
        "/v1/models/alice-only/versions/1/download",
        "/v1/models/alice-only/audit",
        "/v1/models/alice-only/compare?a=1&b=1",
        f"/v1/models/alice-only?tenant={alice_tenant}",
    ):
        response = registry.client.get(path, headers=as_bob)
        assert response.status_code == 404, path
        assert response.get_json()["error"]["code"] == "not_found"
    patched = registry.client.patch("/v1/models/alice-only", json={"tags": {"x": "y"}}, headers=as_bob)
    assert patched.status_code == 404

    # Partners may describe and tag their own models; only the internal token moves aliases or reads serving.
    tagged = registry.client.patch("/v1/models/alice-only", json={"tags": {"team": "nlp"}}, headers=as_alice)
    assert tagged.status_code == 200 and tagged.get_json()["tags"] == {"team": "nlp"}
    body = {"tenant": alice_tenant, "version": 1, "reason": "x"}
    assert registry.client.put("/v1/models/alice-only/aliases/staging", json=body, headers=as_alice).status_code == 401
    assert registry.client.get("/v1/internal/serving", headers=as_alice).status_code == 401
    assert registry.client.get("/v1/internal/serving").status_code == 401
    assert registry.client.get("/v1/models").status_code == 401
    assert registry.client.get("/v1/models", headers=bearer("fwk_" + "x" * 43)).status_code == 401

    no_tenant = registry.client.get("/v1/models", headers=INTERNAL)
    assert no_tenant.status_code == 422 and "tenant" in no_tenant.get_json()["error"]["details"]["fields"]
    with_tenant = registry.client.get("/v1/models", query_string={"tenant": bob_tenant}, headers=INTERNAL)
    assert [m["name"] for m in with_tenant.get_json()["models"]] == ["shared-name"]
    served = registry.client.get("/v1/internal/serving", headers=INTERNAL).get_json()["models"]
    assert sorted((m["tenant"], m["model_name"]) for m in served) == sorted(
        [(alice_tenant, "alice-only"), (alice_tenant, "shared-name"), (bob_tenant, "shared-name")]
    )


def test_refused_registrations_are_listed_to_their_own_tenant_only(platform) -> None:
    ingestion = platform("ingestion")
    registry = platform("registry")
    alice, bob = create_partner(ingestion.client, "alice"), create_partner(ingestion.client, "bob")
    runs = RunFactory(registry.runtime.storage)
    payload = runs(alice["partner"]["id"])
    payload["artifacts"]["model.onnx"]["sha256"] = "0" * 64
    deliver(registry.runtime, alice["partner"]["id"], payload)
    mine = registry.client.get("/v1/refused-registrations", headers=bearer(alice["api_key"])).get_json()
    assert [r["run_id"] for r in mine["refusals"]] == [payload["run_id"]]
    assert "sha256" in mine["refusals"][0]["reason"]
    theirs = registry.client.get("/v1/refused-registrations", headers=bearer(bob["api_key"])).get_json()
    assert theirs["refusals"] == [] and theirs["total"] == 0


def _get(registry, path: str, **query):
    response = registry.client.get(path, query_string={"tenant": TENANT, **query}, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_versions_are_paged_filtered_by_tag_alias_and_metric_and_compared(registry, evaluated) -> None:
    for f1 in (0.70, 0.90, 0.80):
        deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=f1))
    deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=0.85, snapshot_id="snap-2", y_true=balanced(300)))
    # v1 production; v2 production (beats by 0.2); v3, v4 staging (0.85 < 0.90 + margin)
    tagged = registry.client.patch(
        "/v1/models/reviews-clf/versions/3", json={"tenant": TENANT, "tags": {"candidate": "yes"}}, headers=INTERNAL
    )
    assert tagged.status_code == 200 and tagged.get_json()["tags"] == {"candidate": "yes"}

    page = _get(registry, "/v1/models/reviews-clf/versions", limit=3)
    assert [v["version"] for v in page["versions"]] == [4, 3, 2]
    assert (page["total"], page["next_offset"]) == (4, 3)
    rest = _get(registry, "/v1/models/reviews-clf/versions", limit=3, offset=3)
    assert [v["version"] for v in rest["versions"]] == [1] and rest["next_offset"] is None

    def versions(**query) -> list[int]:
        return [v["version"] for v in _get(registry, "/v1/models/reviews-clf/versions", **query)["versions"]]

    assert versions(order_by="metric") == [2, 4, 3, 1]
    assert versions(min_metric=0.8, max_metric=0.86) == [4, 3]
    assert versions(metric="accuracy", min_metric=0.9) == [2]
    assert versions(tag="candidate") == [3]
    assert versions(tag="candidate:no") == []
    assert versions(alias="production") == [2]
    assert versions(alias="staging") == [4]

    put_alias(registry.client, TENANT, "reviews-clf", "champion", version=2)
    models = _get(registry, "/v1/models", alias="champion")["models"]
    assert [m["name"] for m in models] == ["reviews-clf"]
    assert models[0]["aliases"]["champion"] == {"version": 2, "weights": {}}
    assert models[0]["latest_version"] == 4 and models[0]["version_count"] == 4
    assert _get(registry, "/v1/models", alias="nobody")["models"] == []
    registry.client.patch("/v1/models/reviews-clf", json={"tenant": TENANT, "tags": {"team": "nlp"}}, headers=INTERNAL)
    assert [m["name"] for m in _get(registry, "/v1/models", tag="team:nlp")["models"]] == ["reviews-clf"]
    assert _get(registry, "/v1/models", tag="team:cv")["models"] == []

    compared = _get(registry, "/v1/models/reviews-clf/compare", a=1, b=2)
    rows = {row["name"]: row for row in compared["metrics"]}
    assert rows["macro_f1"] == {"name": "macro_f1", "a": 0.7, "b": 0.9, "delta": pytest.approx(0.2)}
    assert rows["per_class.pos.f1"]["delta"] == pytest.approx(0.2)
    assert compared["same_validation_split"] is True
    assert (compared["a"]["version"], compared["b"]["version"]) == (1, 2)
    # v2's gate decision scored v1 on v2's test items: the two side by side there, per class.
    assert compared["same_evaluation_set"] is True
    shared = compared["evaluation"]
    assert shared["scored_by"] == 2
    assert shared["evaluation_set"] == _get(registry, "/v1/models/reviews-clf/versions/2")["decision"]["evaluation_set"]
    per_class = {row["label"]: row for row in shared["per_class"]}
    assert set(per_class) == {"neg", "pos"} and per_class["neg"]["support"] == 100
    assert per_class["neg"]["a"] == pytest.approx(0.70) and per_class["neg"]["b"] == pytest.approx(0.90)
    assert per_class["neg"]["delta"] == pytest.approx(0.20)
    flipped = _get(registry, "/v1/models/reviews-clf/compare", a=2, b=1)["evaluation"]
    assert {row["label"]: row["a"] for row in flipped["per_class"]} == {
        row["label"]: row["b"] for row in shared["per_class"]
    }
    # v3 was scored against v2, not v1, but on the very items v1's own decision scored it on (equal sha256).
    alike = _get(registry, "/v1/models/reviews-clf/compare", a=1, b=3)
    assert alike["same_evaluation_set"] is True and alike["evaluation"]["scored_by"] is None
    assert {row["label"]: (row["a"], row["b"]) for row in alike["evaluation"]["per_class"]} == {
        "neg": (pytest.approx(0.70), pytest.approx(0.80)),
        "pos": (pytest.approx(0.70), pytest.approx(0.80)),
    }
    # v1 and v4 never met: v4 was scored against v2 on another snapshot's items. Each shows its own set.
    apart = _get(registry, "/v1/models/reviews-clf/compare", a=1, b=4)
    assert apart["same_evaluation_set"] is False and apart["evaluation"] is None
    assert apart["a"]["scores"]["macro_f1"] == pytest.approx(0.70)
    assert (apart["a"]["evaluation_set"]["items"], apart["b"]["evaluation_set"]["items"]) == (200, 300)
    missing = registry.client.get(
        "/v1/models/reviews-clf/compare", query_string={"tenant": TENANT, "a": 1, "b": 9}, headers=INTERNAL
    )
    assert missing.status_code == 404


def test_a_download_url_serves_the_verified_bytes(registry, runs) -> None:
    payload = runs(TENANT)
    deliver(registry.runtime, TENANT, payload)
    body = _get(registry, "/v1/models/reviews-clf/versions/1/download", expires_in=60)
    assert set(body["files"]) == {"model.onnx", "tokenizer.json", "metadata.json"}
    onnx = body["files"]["model.onnx"]
    fetched = requests.get(onnx["url"], timeout=10)
    assert fetched.status_code == 200
    assert hashlib.sha256(fetched.content).hexdigest() == onnx["sha256"] == payload["artifacts"]["model.onnx"]["sha256"]
    assert len(fetched.content) == onnx["size"]
    assert "X-Amz-Expires=60" in onnx["url"]
    too_long = registry.client.get(
        "/v1/models/reviews-clf/versions/1/download",
        query_string={"tenant": TENANT, "expires_in": 99999},
        headers=INTERNAL,
    )
    assert too_long.status_code == 422


def test_the_serving_endpoint_follows_aliases_and_a_removed_alias_is_announced(registry, evaluated) -> None:
    first = evaluated(TENANT, macro_f1=0.8)
    deliver(registry.runtime, TENANT, first)
    deliver(registry.runtime, TENANT, evaluated(TENANT, macro_f1=0.7))
    deliver(registry.runtime, TENANT, evaluated(TENANT, "no-alias-yet", macro_f1=0.7))
    put_alias(registry.client, TENANT, "no-alias-yet", "production", version=1)
    registry.client.delete(
        "/v1/models/no-alias-yet/aliases/production",
        query_string={"tenant": TENANT, "reason": "withdrawn"},
        headers=INTERNAL,
    )

    everything = registry.client.get("/v1/internal/serving", headers=INTERNAL).get_json()["models"]
    assert [m["model_name"] for m in everything] == ["reviews-clf"]  # the model without an alias is left out
    served = registry.client.get(f"/v1/internal/serving/{TENANT}/reviews-clf", headers=INTERNAL).get_json()
    assert served == everything[0]
    assert (served["tenant"], served["dataset_id"], served["task_type"]) == (
        TENANT,
        first["dataset_id"],
        "text_classification",
    )
    assert served["aliases"] == {"production": {"version": 1, "weights": {}}, "staging": {"version": 2, "weights": {}}}
    v1 = served["versions"]["1"]
    assert v1["version"] == 1 and v1["status"] == "ready"
    assert v1["metadata"] == first["metadata"]
    assert v1["artifacts"]["model.onnx"] == {
        **{k: first["artifacts"]["model.onnx"][k] for k in ("bucket", "key", "sha256")},
        "size": first["metadata"]["files"]["model.onnx"]["size"],
    }

    unaliased = registry.client.get(f"/v1/internal/serving/{TENANT}/no-alias-yet", headers=INTERNAL)
    assert unaliased.status_code == 404  # nothing to serve: a replica unloads it
    assert "nothing to serve" in unaliased.get_json()["error"]["message"]
    removed = [e for e in outbox(registry.runtime, "model.promoted") if e["payload"]["model_name"] == "no-alias-yet"]
    assert removed[-1]["payload"] == {
        "model_name": "no-alias-yet",
        "dataset_id": first["dataset_id"],
        "alias": "production",
        "version": None,
        "previous_version": 1,
        "weights": {},
        "reason": "withdrawn",
    }
    audit = _get(registry, "/v1/models/no-alias-yet/audit")["changes"]
    assert (audit[0]["action"], audit[0]["from_version"], audit[0]["to_version"]) == ("remove", 1, None)
    assert registry.client.get(f"/v1/internal/serving/{TENANT}/nothing", headers=INTERNAL).status_code == 404
    assert registry.client.get("/v1/internal/serving/other-tenant/reviews-clf", headers=INTERNAL).status_code == 404


def test_the_openapi_document_lists_the_registry_endpoints(registry) -> None:
    document = registry.client.get("/openapi.json").get_json()
    paths = document["paths"]
    for path in (
        "/v1/models",
        "/v1/models/{model_name}/versions/{version}",
        "/v1/models/{model_name}/aliases/{alias}",
        "/v1/models/{model_name}/rollback",
        "/v1/models/{model_name}/compare",
        "/v1/models/{model_name}/versions/{version}/download",
        "/v1/models/{model_name}/versions/{version}/archive",
        "/v1/models/{model_name}/audit",
        "/v1/models/{model_name}/policy",
        "/v1/refused-registrations",
        "/v1/internal/serving",
        "/v1/internal/serving/{tenant}/{model_name}",
    ):
        assert path in paths, path
    assert {"put", "delete"} <= set(paths["/v1/models/{model_name}/aliases/{alias}"])
