"""The promotion gate, manual promotion, rollback, canaries and archiving: every alias move audited and announced.

The gate's tests write real evaluation reports (tests/registry/evaluations.py) beside real run folders in S3 and
deliver training.completed through the registry's consumer; each scenario is built so that exactly the
condition under test decides, and each asserts what an operator sees: the aliases, the decision on the version,
the audit log and the model.promoted event.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from services.registry.comparison import paired_bootstrap, seed_for
from tests.helpers import INTERNAL, bearer
from tests.registry.evaluations import Quality, balanced
from tests.registry.support import deliver, outbox, put_alias

pytestmark = pytest.mark.timeout(60)

TENANT = "ptn_registry_p"
MODEL = "reviews-clf"
INTENTS = ["billing", "delivery", "refund", "other"]


def register(registry, payload) -> None:
    assert deliver(registry.runtime, TENANT, payload) == "handled"


def get(registry, path: str, **query):
    response = registry.client.get(path, query_string={"tenant": TENANT, **query}, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def aliases(registry, model: str = MODEL) -> dict:
    return get(registry, f"/v1/models/{model}")["aliases"]


def decision(registry, version: int, model: str = MODEL) -> dict:
    return get(registry, f"/v1/models/{model}/versions/{version}")["decision"]


def conditions(decided: dict) -> dict[str, dict]:
    return {condition["name"]: condition for condition in decided["conditions"]}


def failed(decided: dict) -> list[str]:
    return [condition["name"] for condition in decided["conditions"] if not condition["passed"]]


def promoted_events(registry) -> list[dict]:
    return [event["payload"] for event in outbox(registry.runtime, "model.promoted")]


def set_policy(registry, **policy):
    return registry.client.put(f"/v1/models/{MODEL}/policy", json={"tenant": TENANT, **policy}, headers=INTERNAL)


def test_a_clearly_better_candidate_is_promoted_and_its_decision_rescored_production_on_the_same_items(
    registry, evaluated, logs
) -> None:
    # v1's training record says 0.78 on its own validation split; on the frozen test items it answers at 0.70.
    register(registry, evaluated(TENANT, macro_f1=0.78, quality=0.70, snapshot_id="snap-1"))
    first = decision(registry, 1)
    assert first["outcome"] == "production" and first["production"] is None
    assert [(c["id"], c["name"], c["passed"]) for c in first["conditions"]] == [
        ("0", "min_test_items", True),
        ("d", "min_score", True),
    ]
    assert conditions(first)["min_score"]["floor_source"] == "the majority baseline on the same items"

    test_items = balanced(300)
    candidate = evaluated(TENANT, macro_f1=0.91, quality=0.90, snapshot_id="snap-2", y_true=test_items)
    register(registry, candidate)

    assert aliases(registry)["production"] == {"version": 2, "weights": {}}
    decided = decision(registry, 2)
    assert decided["outcome"] == "production", decided["reason"]
    assert decided["evaluation_set"]["snapshot_id"] == "snap-2"
    assert (decided["evaluation_set"]["split"], decided["evaluation_set"]["items"]) == ("test", 300)
    v1_answers = Quality(0.70).answers(test_items, 2)
    v2_answers = Quality(0.90).answers(test_items, 2)
    expected_production = f1_score(test_items, v1_answers, average="macro")
    expected_candidate = f1_score(test_items, v2_answers, average="macro")
    assert decided["production"]["version"] == 1
    assert decided["production"]["metrics"]["macro_f1"] == pytest.approx(expected_production)
    assert decided["production"]["metrics"]["macro_f1"] != pytest.approx(0.78)  # not production's own record
    assert decided["candidate"]["metrics"]["macro_f1"] == pytest.approx(expected_candidate)
    assert decided["candidate"]["metrics"]["per_class"]["neg"]["support"] == 150
    assert decided["baselines"]["majority"]["accuracy"] == pytest.approx(0.5)
    difference = decided["difference"]
    assert difference["metric"] == "macro_f1" and difference["method"] == "paired_bootstrap"
    assert difference["value"] == pytest.approx(expected_candidate - expected_production)
    assert 0 < difference["ci_low"] < difference["value"] < difference["ci_high"]
    assert (difference["confidence"], difference["samples"]) == (0.95, 2000)
    assert difference["seed"] == seed_for(decided["evaluation_set"]["sha256"])
    assert [(c["id"], c["passed"]) for c in decided["conditions"]] == [
        ("0", True),
        ("a", True),
        ("b", True),
        ("c", True),
        ("d", True),
    ]
    margin = conditions(decided)["margin"]
    assert (margin["threshold"], margin["production"]) == (0.01, pytest.approx(expected_production))

    # The same interval, recomputed from the answers with the documented seed: the decision is reproducible.
    interval = paired_bootstrap(
        "macro_f1",
        np.array(test_items),
        np.array(v2_answers),
        np.array(v1_answers),
        2,
        samples=2000,
        confidence=0.95,
        seed=difference["seed"],
    )
    assert (difference["ci_low"], difference["ci_high"]) == (interval.low, interval.high)

    audit = get(registry, f"/v1/models/{MODEL}/audit")["changes"]
    assert [(c["alias"], c["action"], c["from_version"], c["to_version"]) for c in audit] == [
        ("production", "auto_promote", 1, 2),
        ("production", "auto_promote", None, 1),
    ]
    reason = audit[0]["reason"]
    assert reason.startswith("promotion gate: v2 -> production: v2 passes every condition against production v1")
    assert "test split of snapshot snap-2 (300 items" in reason
    assert f"vs production v1 {expected_production:.4f} (recomputed on this set)" in reason
    assert "(b) credible_improvement passed" in reason
    assert promoted_events(registry)[-1]["reason"] == reason
    logged = logs.find(event="promotion_decided", version=2)
    assert logged and logged[0]["outcome"] == "production" and logged[0]["failed"] == []
    assert logged[0]["production_value"] == pytest.approx(expected_production)

    # The OpenAPI document types the decision for a client generator.
    schemas = registry.client.get("/openapi.json").get_json()["components"]["schemas"]
    version_decision = schemas["Version"]["properties"]["decision"]
    assert "Decision" in str(version_decision)
    assert {"evaluation_set", "candidate", "production", "baselines", "difference", "conditions", "outcome"} <= set(
        schemas["Decision"]["properties"]
    )


def test_a_worse_candidate_is_staged_by_the_margin_and_production_keeps_serving(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, macro_f1=0.85))
    register(registry, evaluated(TENANT, macro_f1=0.70))

    assert aliases(registry) == {"production": {"version": 1, "weights": {}}, "staging": {"version": 2, "weights": {}}}
    served = registry.client.get(f"/v1/internal/serving/{TENANT}/{MODEL}", headers=INTERNAL).get_json()
    assert served["aliases"]["production"]["version"] == 1
    decided = decision(registry, 2)
    assert decided["outcome"] == "staging"
    assert "margin" in failed(decided) and "credible_improvement" in failed(decided)
    margin = conditions(decided)["margin"]
    assert margin["observed"] == pytest.approx(-0.15, abs=0.01) and margin["passed"] is False
    assert decided["reason"].startswith("refused by (a) margin: macro_f1 0.7000 vs production v1 0.8500")
    event = promoted_events(registry)[-1]
    assert (event["alias"], event["version"]) == ("staging", 2)
    assert "(a) margin FAILED" in event["reason"]


def test_a_candidate_better_on_average_with_one_class_collapsed_is_refused_by_the_per_class_guard(
    registry, evaluated
) -> None:
    items = balanced(400, len(INTENTS))
    register(registry, evaluated(TENANT, labels=INTENTS, quality=0.70, y_true=items))
    collapsed = Quality({0: 1.0, 1: 1.0, 2: 1.0, 3: 0.40})  # 'other' is mostly answered as 'billing'
    register(registry, evaluated(TENANT, labels=INTENTS, quality=collapsed, y_true=items))

    decided = decision(registry, 2)
    assert decided["outcome"] == "staging"
    assert failed(decided) == ["class_regression"]  # better on average, credibly: only the guard refuses
    assert decided["difference"]["value"] > 0.1 and decided["difference"]["ci_low"] > 0
    guard = conditions(decided)["class_regression"]
    assert guard["worst_class"] == "other"
    rows = {row["label"]: row for row in guard["per_class"]}
    assert rows["other"]["production"] == pytest.approx(0.70)
    assert rows["other"]["candidate"] == pytest.approx(80 / 140)  # 40 of 100 right, nothing else called 'other'
    assert rows["other"]["drop"] == pytest.approx(0.70 - 80 / 140) and guard["threshold"] == 0.10
    assert rows["delivery"]["drop"] < 0
    assert "'other' 0.7000 -> 0.5714" in decided["reason"]
    assert aliases(registry)["production"]["version"] == 1


def test_a_small_difference_on_a_small_test_split_is_refused_as_noise_though_it_clears_the_margin(
    registry, evaluated
) -> None:
    items = balanced(40)  # 20 per class: enough to decide by the default min_test_items (30), little to go on
    production = Quality(0.80)  # wrong on ranks 0-3 of each class
    candidate = Quality({0: 0.85, 1: 0.80}, start=2)  # fixes 4 of those, breaks 3 others: one item better
    register(registry, evaluated(TENANT, quality=production, y_true=items))
    register(registry, evaluated(TENANT, quality=candidate, y_true=items))

    decided = decision(registry, 2)
    assert decided["outcome"] == "staging"
    assert failed(decided) == ["credible_improvement"]
    assert conditions(decided)["margin"]["observed"] >= 0.01
    credible = conditions(decided)["credible_improvement"]
    assert credible["ci_low"] <= 0 < credible["ci_high"]
    assert decided["reason"].startswith("refused by (b) credible_improvement: within noise: the 95% interval")

    # On accuracy the same items: one item better (+0.025), McNemar's exact test beside the bootstrap.
    assert set_policy(registry, primary_metric="accuracy").status_code == 200
    register(registry, evaluated(TENANT, quality=candidate, y_true=items))
    decided = decision(registry, 3)
    assert decided["outcome"] == "staging" and failed(decided) == ["credible_improvement"]
    assert conditions(decided)["margin"]["observed"] == pytest.approx(0.025)
    credible = conditions(decided)["credible_improvement"]
    assert (credible["only_candidate_right"], credible["only_production_right"]) == (4, 3)
    assert credible["p_value"] == pytest.approx(1.0)
    assert "McNemar" in credible["detail"]


def test_a_test_split_too_small_to_decide_is_staged_whatever_its_numbers(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, quality=0.50, y_true=balanced(200)))
    register(registry, evaluated(TENANT, quality=0.95, y_true=balanced(20)))

    decided = decision(registry, 2)
    assert decided["outcome"] == "staging"
    assert failed(decided) == ["min_test_items"]
    assert decided["reason"] == (
        "refused by (0) min_test_items: too small to decide: the test split has 20 items, the policy needs at least 30"
    )
    assert (conditions(decided)["min_test_items"]["observed"], conditions(decided)["min_test_items"]["threshold"]) == (
        20,
        30,
    )

    # A snapshot from before the test split: the run scored no items at all.
    register(registry, evaluated(TENANT, quality=0.95, y_true=[]))
    empty = decision(registry, 3)
    assert (empty["outcome"], empty["evaluation_set"]["items"]) == ("staging", 0)
    assert "too small to decide: the test split has 0 items" in empty["reason"]

    assert set_policy(registry, min_test_items=10).status_code == 200  # an operator accepts a smaller set
    register(registry, evaluated(TENANT, quality=0.95, y_true=balanced(20)))
    assert decision(registry, 4)["outcome"] == "production"
    assert aliases(registry)["production"]["version"] == 4


def test_a_first_version_below_the_majority_baseline_is_refused_and_min_score_sets_the_floor(
    registry, evaluated
) -> None:
    register(registry, evaluated(TENANT, quality=0.30))  # macro-F1 0.30; always-'neg' scores 0.33 here
    decided = decision(registry, 1)
    assert decided["outcome"] == "staging" and decided["production"] is None
    assert failed(decided) == ["min_score"]
    floor = conditions(decided)["min_score"]
    assert floor["threshold"] == pytest.approx(f1_score(balanced(200), [0] * 200, average="macro"))
    assert floor["observed"] == pytest.approx(0.30) and floor["lift"] == pytest.approx(0.30 - floor["threshold"])
    assert "is below the floor 0.3333 (the majority baseline on the same items)" in decided["reason"]
    assert aliases(registry) == {"staging": {"version": 1, "weights": {}}}

    assert set_policy(registry, min_score=0.25).status_code == 200
    register(registry, evaluated(TENANT, quality=0.30))
    decided = decision(registry, 2)
    assert decided["outcome"] == "production"
    assert conditions(decided)["min_score"]["floor_source"] == "the policy's min_score"
    assert conditions(decided)["min_score"]["threshold"] == 0.25


def test_the_classical_baseline_floor_refuses_a_model_that_does_not_beat_ten_lines_of_scikit_learn(
    registry, evaluated
) -> None:
    # Macro-F1 0.70: well above always-'neg' (0.33), below TF-IDF + logistic regression (0.80) on the same items.
    register(registry, evaluated(TENANT, quality=0.70, classical=Quality(0.80)))
    first = decision(registry, 1)
    assert first["outcome"] == "production"  # the default floor is the majority baseline
    floor = conditions(first)["min_score"]
    assert (floor["floor_baseline"], floor["threshold"]) == ("majority", pytest.approx(1 / 3))
    expected_lift = f1_score(balanced(200), Quality(0.70).answers(balanced(200), 2), average="macro") - f1_score(
        balanced(200), Quality(0.80).answers(balanced(200), 2), average="macro"
    )
    # Whatever the floor, the version records what fine-tuning earned over the classical baseline (here: a loss).
    assert first["baseline_lift"] == pytest.approx(expected_lift) and expected_lift < -0.05
    assert get(registry, f"/v1/models/{MODEL}/versions/1")["baseline_lift"] == pytest.approx(expected_lift)
    assert first["baselines"]["classical"]["macro_f1"] == pytest.approx(0.80)
    assert (
        "lift over the classical baseline -0.1000"
        in outbox(registry.runtime, "model.promoted")[-1]["payload"]["reason"]
    )

    assert set_policy(registry, floor="classical_baseline").status_code == 200
    register(registry, evaluated(TENANT, "docs-clf", quality=0.70, classical=Quality(0.80)))  # a first version
    response = registry.client.put(
        "/v1/models/docs-clf/policy", json={"tenant": TENANT, "floor": "classical_baseline"}, headers=INTERNAL
    )
    assert response.status_code == 200 and response.get_json()["policy"]["floor"] == "classical_baseline"
    register(registry, evaluated(TENANT, "docs-clf", quality=0.75, classical=Quality(0.80)))
    refused = decision(registry, 2, model="docs-clf")
    assert refused["outcome"] == "staging" and failed(refused) == ["min_score"]
    floor = conditions(refused)["min_score"]
    assert floor["floor_baseline"] == "classical" and floor["threshold"] == pytest.approx(0.80)
    assert floor["floor_source"] == "the classical baseline on the same items"
    assert "is below the floor 0.8000 (the classical baseline on the same items)" in refused["reason"]
    assert aliases(registry, "docs-clf")["production"]["version"] == 1

    # Beating production and the classical baseline both: promoted.
    register(registry, evaluated(TENANT, "docs-clf", quality=0.92, classical=Quality(0.80)))
    promoted = decision(registry, 3, model="docs-clf")
    assert promoted["outcome"] == "production", promoted["reason"]
    assert conditions(promoted)["min_score"]["threshold"] == pytest.approx(0.80)
    assert promoted["baseline_lift"] == pytest.approx(
        f1_score(balanced(200), Quality(0.92).answers(balanced(200), 2), average="macro") - 0.80
    )

    # A run from before the classical baseline: the floor falls back to the majority baseline, and says so.
    register(registry, evaluated(TENANT, quality=0.75))
    fallback = decision(registry, 2)
    floor = conditions(fallback)["min_score"]
    assert floor["floor_baseline"] == "majority" and floor["threshold"] == pytest.approx(1 / 3)
    assert "the classical baseline, which the report does not carry" in floor["detail"]
    assert fallback["baseline_lift"] is None
    assert get(registry, f"/v1/models/{MODEL}/versions/2")["baseline_lift"] is None


def test_when_production_moves_while_a_candidate_is_evaluated_the_candidate_is_staged(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, macro_f1=0.70))
    slow = evaluated(TENANT, macro_f1=0.90)  # scored against v1 ...
    register(registry, evaluated(TENANT, macro_f1=0.85))  # ... while another run became v2, in production
    assert aliases(registry)["production"]["version"] == 2
    register(registry, slow)

    decided = decision(registry, 3)
    assert decided["outcome"] == "staging"
    assert decided["reason"] == (
        "the gate cannot decide: production moved while the candidate was evaluated: the report scored v1, "
        "production is v2 now; a person decides"
    )
    assert decided["production"]["version"] == 1  # what the report compared with, kept for the person deciding
    assert aliases(registry)["production"]["version"] == 2


def test_runs_without_a_usable_evaluation_report_are_staged_for_a_person(registry, runs, evaluated) -> None:
    old_style = runs(TENANT, macro_f1=0.99)  # a run published before the gate compared on frozen items
    assert "evaluation" not in old_style
    register(registry, old_style)
    decided = decision(registry, 1)
    assert decided["outcome"] == "staging"
    assert decided["reason"].startswith("the gate cannot decide: the run carries no evaluation report")
    assert (decided["evaluation_set"], decided["conditions"], decided["report"]) == (None, [], None)
    put_alias(registry.client, TENANT, MODEL, "production", version=1, reason="reviewed by hand")
    evaluated.qualities[old_style["run_id"]] = Quality(0.70)  # how v1's artifact answers the test items

    unscored = evaluated(TENANT, macro_f1=0.95, production_error="model.onnx of v1 failed sha256 verification")
    register(registry, unscored)
    assert (
        "production v1 could not be scored on the test split: model.onnx of v1 failed"
        in decision(registry, 2)["reason"]
    )

    tampered = evaluated(TENANT, macro_f1=0.95)
    registry.runtime.storage.put(tampered["evaluation"]["bucket"], tampered["evaluation"]["key"], b'{"forged": 1}')
    register(registry, tampered)
    assert "evaluation.json failed verification: sha256 mismatch" in decision(registry, 3)["reason"]

    def boast(report: dict) -> None:
        report["candidate"]["metrics"]["macro_f1"] = 0.99

    register(registry, evaluated(TENANT, macro_f1=0.95, edit=boast))
    assert (
        "the report's macro_f1 for the candidate (0.9900) disagrees with its own predictions (0.9500)"
        in (decision(registry, 4)["reason"])
    )

    def on_validation(report: dict) -> None:
        report["evaluation_set"]["split"] = "validation"

    register(registry, evaluated(TENANT, macro_f1=0.95, edit=on_validation))
    assert "the report scores the validation split" in decision(registry, 5)["reason"]

    assert [decision(registry, v)["outcome"] for v in range(2, 6)] == ["staging"] * 4
    assert aliases(registry)["production"]["version"] == 1
    assert get(registry, f"/v1/models/{MODEL}/versions", status="ready")["total"] == 5  # registered, not refused


def test_automatic_promotion_off_and_a_running_canary_stage_even_a_version_that_passes(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, macro_f1=0.70))
    assert set_policy(registry, auto_promote=False).status_code == 200
    register(registry, evaluated(TENANT, macro_f1=0.90))
    decided = decision(registry, 2)
    assert decided["outcome"] == "staging" and failed(decided) == []
    assert decided["reason"] == (
        "automatic promotion is off for this model; promote by hand (v2 passes every condition against production v1)"
    )


def test_the_policy_endpoint_documents_defaults_and_refuses_retired_unknown_and_bad_fields(registry, evaluated) -> None:
    register(registry, evaluated(TENANT))
    defaults = get(registry, f"/v1/models/{MODEL}")["policy"]
    assert defaults == {
        "primary_metric": "macro_f1",
        "margin": 0.01,
        "auto_promote": True,
        "confidence": 0.95,
        "max_class_regression": 0.10,
        "min_score": None,
        "floor": "majority",
        "min_test_items": 30,
        "bootstrap_samples": 2000,
    }

    retired = set_policy(registry, require_same_split=True)
    assert retired.status_code == 422
    body = retired.get_json()["error"]
    assert body["code"] == "validation_failed"
    assert "same frozen test items" in body["details"]["fields"]["json"]["require_same_split"][0]
    bad = {
        "primary_metric": "f2",
        "margin": -0.1,
        "confidence": 1.5,
        "max_class_regression": 2,
        "min_score": 7,
        "floor": "tfidf",
        "min_test_items": 0,
        "bootstrap_samples": 10,
        "auto_promote": "sometimes",
        "colour": "blue",
    }
    for name, value in bad.items():
        response = set_policy(registry, **{name: value})
        assert response.status_code == 422, (name, response.get_json())
        assert name in response.get_json()["error"]["details"]["fields"]["json"], name
    nothing = set_policy(registry)
    assert nothing.status_code == 422
    assert get(registry, f"/v1/models/{MODEL}")["policy"] == defaults  # nothing half-written

    changed = set_policy(registry, confidence=0.99, min_score=0.4, bootstrap_samples=500, actor="alice")
    assert changed.status_code == 200, changed.get_json()
    assert changed.get_json()["policy"] == {**defaults, "confidence": 0.99, "min_score": 0.4, "bootstrap_samples": 500}
    reset = set_policy(registry, min_score=None)
    assert reset.get_json()["policy"]["min_score"] is None
    document = registry.client.get("/openapi.json").get_json()["components"]["schemas"]
    assert "majority baseline" in document["PolicyUpdate"]["properties"]["min_score"]["description"]
    assert "require_same_split" not in document["PolicyUpdate"]["properties"]
    assert document["PolicyUpdate"]["properties"]["floor"]["enum"] == ["majority", "classical_baseline"]
    assert "baseline_lift" in document["Version"]["properties"]


def test_manual_promotion_and_one_call_rollback_walk_back_through_production_history(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, macro_f1=0.80))  # v1 production
    register(registry, evaluated(TENANT, macro_f1=0.70))  # v2 staging
    register(registry, evaluated(TENANT, macro_f1=0.75))  # v3 staging

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


def test_canary_weights_are_validated_served_and_ended_by_a_promotion(registry, evaluated) -> None:
    for _ in range(3):
        register(registry, evaluated(TENANT, macro_f1=0.80))  # v1 production; v2, v3 no better: staging
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

    register(registry, evaluated(TENANT, macro_f1=0.99))  # the gate does not cut a canary short
    assert aliases(registry)["production"]["weights"] == {"1": 90, "2": 10}
    assert aliases(registry)["staging"]["version"] == 4
    decided = decision(registry, 4)
    assert decided["reason"].startswith("production is running a canary; automatic promotion waits until it ends")
    assert failed(decided) == []  # it would have passed: the person ending the canary can see so

    put_alias(registry.client, TENANT, MODEL, "production", version=2, reason="canary went well")
    assert aliases(registry)["production"] == {"version": 2, "weights": {}}
    served = registry.client.get(f"/v1/internal/serving/{TENANT}/{MODEL}", headers=INTERNAL).get_json()
    assert set(served["versions"]) == {"2", "4"}


def test_archive_is_refused_while_an_alias_or_a_canary_weight_points_at_the_version(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, macro_f1=0.80))  # v1 production
    register(registry, evaluated(TENANT, macro_f1=0.70))  # v2 staging
    register(registry, evaluated(TENANT, macro_f1=0.70))  # v3 staging; v2 is free
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


def test_alias_changes_need_the_internal_token(registry, evaluated) -> None:
    register(registry, evaluated(TENANT))
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


def test_a_production_answer_outside_the_candidates_labels_counts_as_wrong_not_as_a_class(registry, evaluated) -> None:
    register(registry, evaluated(TENANT, quality=Quality(0.80, unknown=True)))  # its mistakes name no label here
    register(registry, evaluated(TENANT, quality=0.95))

    decided = decision(registry, 2)
    assert not decided["reason"].startswith("the gate cannot decide"), decided["reason"]
    production = decided["production"]["metrics"]
    assert production["accuracy"] == pytest.approx(0.80)
    assert production["per_class"]["neg"] == {
        "precision": 1.0,
        "recall": 0.8,
        "f1": pytest.approx(160 / 180),
        "support": 100,
    }
    assert production["macro_f1"] == pytest.approx(160 / 180)
    assert decided["outcome"] == "production"
