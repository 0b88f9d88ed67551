"""The promotion gate, manual promotion, rollback, canaries and archiving: every alias move audited and announced."""

from __future__ import annotations

import pytest

from services.registry.promotion import Evaluation, decide
from tests.helpers import INTERNAL, bearer
from tests.registry.support import deliver, outbox, put_alias

pytestmark = pytest.mark.timeout(60)

TENANT = "ptn_registry_p"
MODEL = "reviews-clf"


def register(registry, runs, **kwargs) -> None:
    assert deliver(registry.runtime, TENANT, runs(TENANT, **kwargs)) == "handled"


def get(registry, path: str, **query):
    response = registry.client.get(path, query_string={"tenant": TENANT, **query}, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def aliases(registry) -> dict:
    return get(registry, f"/v1/models/{MODEL}")["aliases"]


def promoted_events(registry) -> list[dict]:
    return [event["payload"] for event in outbox(registry.runtime, "model.promoted")]


def test_gated_promotion_both_ways_records_the_decision_and_its_numbers(registry, runs, logs) -> None:
    register(registry, runs, macro_f1=0.80)  # v1: nothing in production yet
    register(registry, runs, macro_f1=0.805)  # v2: better, but by less than the 0.01 margin
    register(registry, runs, macro_f1=0.83)  # v3: better by 0.03

    assert aliases(registry) == {
        "production": {"version": 3, "weights": {}},
        "staging": {"version": 2, "weights": {}},
    }
    staged = get(registry, f"/v1/models/{MODEL}/versions/2")["decision"]
    assert staged["outcome"] == "staging"
    assert staged["metric"] == "macro_f1" and staged["margin"] == 0.01
    assert staged["candidate"]["value"] == 0.805
    assert staged["production"] == {"version": 1, "value": 0.8, "snapshot_id": "snap-1"}
    assert staged["delta"] == pytest.approx(0.005)
    assert staged["same_validation_split"] is True
    assert "does not beat production by the margin 0.01" in staged["reason"]
    promoted = get(registry, f"/v1/models/{MODEL}/versions/3")["decision"]
    assert promoted["outcome"] == "production" and promoted["delta"] == pytest.approx(0.03)
    assert promoted["production"]["version"] == 1

    assert [(e["alias"], e["version"], e["previous_version"]) for e in promoted_events(registry)] == [
        ("production", 1, None),
        ("staging", 2, None),
        ("production", 3, 1),
    ]
    audit = get(registry, f"/v1/models/{MODEL}/audit")["changes"]
    assert [(c["alias"], c["action"], c["from_version"], c["to_version"]) for c in audit] == [
        ("production", "auto_promote", 1, 3),
        ("staging", "auto_stage", None, 2),
        ("production", "auto_promote", None, 1),
    ]
    assert all(c["actor"] == "registry:promotion-policy" and c["created_at"] for c in audit)
    assert "0.8300 vs production v1 0.8000" in audit[0]["reason"]
    decided = logs.find(event="promotion_decided", version=2)
    assert decided and decided[0]["outcome"] == "staging" and decided[0]["production_value"] == 0.8


def test_a_different_validation_split_is_compared_but_flagged_unless_the_policy_requires_the_same(
    registry, runs
) -> None:
    register(registry, runs, macro_f1=0.80, snapshot_id="snap-1")
    register(registry, runs, macro_f1=0.90, snapshot_id="snap-2")
    decision = get(registry, f"/v1/models/{MODEL}/versions/2")["decision"]
    assert decision["outcome"] == "production"
    assert decision["same_validation_split"] is False
    assert "different validation splits: snapshot snap-2 vs snap-1" in decision["reason"]

    policy = {"tenant": TENANT, "require_same_split": True, "margin": 0.05, "reason": "x"}
    policy.pop("reason")
    response = registry.client.put(f"/v1/models/{MODEL}/policy", json=policy, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["policy"] == {
        "primary_metric": "macro_f1",
        "margin": 0.05,
        "auto_promote": True,
        "require_same_split": True,
    }
    register(registry, runs, macro_f1=0.99, snapshot_id="snap-3")
    decision = get(registry, f"/v1/models/{MODEL}/versions/3")["decision"]
    assert decision["outcome"] == "staging"
    assert "compares only on the same validation split" in decision["reason"]
    assert aliases(registry)["production"]["version"] == 2

    # A policy on another primary metric: accuracy decides now.
    registry.client.put(
        f"/v1/models/{MODEL}/policy",
        json={"tenant": TENANT, "primary_metric": "accuracy", "require_same_split": False},
        headers=INTERNAL,
    )
    register(registry, runs, macro_f1=0.5, accuracy=0.99, snapshot_id="snap-2")
    decision = get(registry, f"/v1/models/{MODEL}/versions/4")["decision"]
    assert (decision["metric"], decision["outcome"]) == ("accuracy", "production")


def test_the_gate_as_a_function() -> None:
    policy = {"primary_metric": "macro_f1", "margin": 0.01, "auto_promote": True, "require_same_split": False}
    production = Evaluation(1, {"macro_f1": 0.80}, "s1")
    assert decide(policy, Evaluation(2, {"macro_f1": 0.81}, "s1"), production)["outcome"] == "production"
    assert decide(policy, Evaluation(2, {"macro_f1": 0.8099}, "s1"), production)["outcome"] == "staging"
    assert decide(policy, Evaluation(2, {"accuracy": 0.9}, "s1"), production)["outcome"] == "staging"
    assert decide(policy, Evaluation(2, {"macro_f1": 0.95}, "s1"), None)["outcome"] == "production"
    canary = decide(policy, Evaluation(2, {"macro_f1": 0.95}, "s1"), production, production_is_canary=True)
    assert canary["outcome"] == "staging" and "canary" in canary["reason"]
    manual = decide({**policy, "auto_promote": False}, Evaluation(2, {"macro_f1": 0.99}, "s1"), production)
    assert manual["outcome"] == "staging"


def test_manual_promotion_and_one_call_rollback_walk_back_through_production_history(registry, runs) -> None:
    register(registry, runs, macro_f1=0.80)  # v1 production
    register(registry, runs, macro_f1=0.70)  # v2 staging
    register(registry, runs, macro_f1=0.75)  # v3 staging

    response = put_alias(registry.client, TENANT, MODEL, "production", version=2, reason="ops drill", actor="alice")
    assert response.status_code == 200, response.get_json()
    change = response.get_json()["change"]
    assert (change["action"], change["from_version"], change["to_version"]) == ("promote", 1, 2)
    assert (change["actor"], change["reason"]) == ("internal-token:alice", "ops drill")
    again = put_alias(registry.client, TENANT, MODEL, "production", version=2, reason="again")
    assert again.status_code == 200 and again.get_json()["changed"] is False
    put_alias(registry.client, TENANT, MODEL, "production", version=3, reason="try v3")

    rollback = registry.client.post(
        f"/v1/models/{MODEL}/rollback",
        json={"tenant": TENANT, "reason": "v3 misbehaves", "actor": "bob"},
        headers=INTERNAL,
    )
    assert rollback.status_code == 200, rollback.get_json()
    change = rollback.get_json()["change"]
    assert (change["action"], change["from_version"], change["to_version"]) == ("rollback", 3, 2)
    assert change["reason"] == "rollback of production from v3 to v2: v3 misbehaves"
    assert rollback.get_json()["model"]["aliases"]["production"]["version"] == 2
    second = registry.client.post(
        f"/v1/models/{MODEL}/rollback", json={"tenant": TENANT, "reason": "r"}, headers=INTERNAL
    )
    assert second.get_json()["change"]["to_version"] == 1
    third = registry.client.post(
        f"/v1/models/{MODEL}/rollback", json={"tenant": TENANT, "reason": "r"}, headers=INTERNAL
    )
    assert third.status_code == 409
    assert "pointed at nothing" in third.get_json()["error"]["message"]

    events = [(e["alias"], e["version"], e["previous_version"]) for e in promoted_events(registry)]
    assert events[-4:] == [("production", 2, 1), ("production", 3, 2), ("production", 2, 3), ("production", 1, 2)]
    assert promoted_events(registry)[-1]["reason"].startswith("rollback of production from v2 to v1")
    audit = get(registry, f"/v1/models/{MODEL}/audit", alias="production")
    assert audit["total"] == len([e for e in events if e[0] == "production"])

    missing = put_alias(registry.client, TENANT, MODEL, "production", version=9)
    assert missing.status_code == 404


def test_canary_weights_are_validated_served_and_ended_by_a_promotion(registry, runs) -> None:
    register(registry, runs, macro_f1=0.80)
    register(registry, runs, macro_f1=0.80)
    register(registry, runs, macro_f1=0.80)
    invalid = {
        "sum": {"1": 90, "2": 5},
        "unknown version": {"1": 50, "9": 50},
        "three versions": {"1": 50, "2": 25, "3": 25},
        "zero": {"1": 100, "2": 0},
        "not an integer": {"1": "90", "2": 10},
        "not a version": {"one": 90, "2": 10},
    }
    for what, weights in invalid.items():
        response = put_alias(registry.client, TENANT, MODEL, "production", weights=weights)
        assert response.status_code == 422, (what, response.get_json())
        assert "weights" in response.get_json()["error"]["details"]["fields"], what
    both = put_alias(registry.client, TENANT, MODEL, "production", weights={"1": 90, "2": 10}, version=2)
    assert both.status_code == 422

    response = put_alias(registry.client, TENANT, MODEL, "production", weights={"2": 10, "1": 90}, reason="canary v2")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["change"]["action"] == "canary"
    served = registry.client.get(f"/v1/internal/serving/{TENANT}/{MODEL}", headers=INTERNAL).get_json()
    assert served["aliases"]["production"] == {"version": 1, "weights": {"1": 90, "2": 10}}
    assert served["aliases"]["staging"] == {"version": 3, "weights": {}}
    assert set(served["versions"]) == {"1", "2", "3"}  # both sides of the split, and staging
    event = promoted_events(registry)[-1]
    assert (event["alias"], event["version"], event["weights"]) == ("production", 1, {"1": 90, "2": 10})

    register(registry, runs, macro_f1=0.99)  # the gate does not cut a canary short
    assert aliases(registry)["production"]["weights"] == {"1": 90, "2": 10}
    assert aliases(registry)["staging"]["version"] == 4

    put_alias(registry.client, TENANT, MODEL, "production", version=2, reason="canary went well")
    assert aliases(registry)["production"] == {"version": 2, "weights": {}}
    served = registry.client.get(f"/v1/internal/serving/{TENANT}/{MODEL}", headers=INTERNAL).get_json()
    assert set(served["versions"]) == {"2", "4"}


def test_archive_is_refused_while_an_alias_or_a_canary_weight_points_at_the_version(registry, runs) -> None:
    register(registry, runs, macro_f1=0.80)  # v1 production
    register(registry, runs, macro_f1=0.70)  # v2 staging
    register(registry, runs, macro_f1=0.70)  # v3 staging; v2 is free
    path = f"/v1/models/{MODEL}/versions/{{}}/archive"
    body = {"tenant": TENANT, "reason": "superseded"}

    refused = registry.client.post(path.format(3), json=body, headers=INTERNAL)
    assert refused.status_code == 409
    assert refused.get_json()["error"]["details"] == {"aliases": ["staging"]}
    put_alias(registry.client, TENANT, MODEL, "production", weights={"1": 80, "2": 20})
    assert registry.client.post(path.format(2), json=body, headers=INTERNAL).status_code == 409
    put_alias(registry.client, TENANT, MODEL, "production", version=1)

    archived = registry.client.post(path.format(2), json=body, headers=INTERNAL)
    assert archived.status_code == 200, archived.get_json()
    assert (archived.get_json()["status"], archived.get_json()["archive_reason"]) == ("archived", "superseded")
    assert put_alias(registry.client, TENANT, MODEL, "production", version=2).status_code == 409
    listed = get(registry, f"/v1/models/{MODEL}/versions", status="archived")
    assert [v["version"] for v in listed["versions"]] == [2]


def test_alias_changes_need_the_internal_token(registry, runs) -> None:
    register(registry, runs)
    body = {"tenant": TENANT, "version": 1, "reason": "x"}
    for headers in ({}, bearer("fwk_" + "x" * 43), bearer("wrong-token")):
        assert (
            registry.client.put(f"/v1/models/{MODEL}/aliases/production", json=body, headers=headers).status_code == 401
        )
        assert registry.client.post(f"/v1/models/{MODEL}/rollback", json=body, headers=headers).status_code == 401
        assert registry.client.put(f"/v1/models/{MODEL}/policy", json=body, headers=headers).status_code == 401
        archive = registry.client.post(f"/v1/models/{MODEL}/versions/1/archive", json=body, headers=headers)
        assert archive.status_code == 401
    assert aliases(registry) == {"production": {"version": 1, "weights": {}}}
