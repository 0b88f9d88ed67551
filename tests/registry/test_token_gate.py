"""The promotion gate of a token_classification model: entity F1 is its metric, recomputed from the report's per-item
entity counts (the shape training writes, services/training/token_runs.py); the guard is per entity type; the policy
takes no classification metric for it, nor entity F1 for a classifier.

Reports are hand-made so that the numbers are known: every test item holds one entity of each type, and a model
either finds it exactly (a true positive) or marks a wrong extent (a false positive and a false negative).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.artifacts import MODELS_BUCKET, EvaluationReport, item_ids_sha256, model_run_prefix
from tests.helpers import INTERNAL
from tests.registry.support import RunFactory, deliver

pytestmark = pytest.mark.timeout(60)

TENANT = "ptn_registry_t"
MODEL = "news-ner"
LABELS = ["PER", "ORG", "LOC"]
ITEMS = 80


def scored(found: dict[str, int], **identity: Any) -> dict[str, Any]:
    """A model that finds the entity of type `label` exactly on the first `found[label]` items, and misses it with
    a wrong extent on the others; its metrics as training writes them."""
    tp = [[int(item < found[label]) for label in LABELS] for item in range(ITEMS)]
    fp = [[1 - hit for hit in row] for row in tp]
    totals = {name: sum(map(sum, rows)) for name, rows in (("tp", tp), ("fp", fp))}
    f1 = 2 * totals["tp"] / (2 * totals["tp"] + 2 * totals["fp"])
    per_type = {
        label: {"precision": found[label] / ITEMS, "recall": found[label] / ITEMS, "f1": found[label] / ITEMS}
        for label in LABELS
    }
    exact = [all(row) for row in tp]
    return {
        "version": None,
        "run_id": None,
        "model_sha256": None,
        **identity,
        "predictions": [0 if hit else -1 for hit in exact],
        "confidences": [1.0] * ITEMS,
        "metrics": {
            "entity_f1": f1,
            "entity_precision": f1,
            "entity_recall": f1,
            "per_type": per_type,
            "items": ITEMS,
            "entity_counts": {"labels": LABELS, "tp": tp, "fp": fp, "fn": fp, "other_fp": [0] * ITEMS},
        },
    }


def token_run(runs: RunFactory, candidate: dict[str, int], production: dict | None, **report_fields: Any) -> dict:
    """A token model's run folder and its evaluation.json; returns the training.completed payload."""
    payload = runs(TENANT, MODEL)
    metadata = payload["metadata"]
    metadata.update(task_type="token_classification", labels=LABELS)
    metadata["outputs"][0]["shape"] = [-1, -1, 1 + 2 * len(LABELS)]
    ref = payload["artifacts"]["metadata.json"]
    ref["sha256"] = runs.storage.put(ref["bucket"], ref["key"], json.dumps(metadata, sort_keys=True).encode()).sha256
    item_ids = [f"item-{i:05d}" for i in range(ITEMS)]
    dictionary = scored({"PER": 8, "ORG": 8, "LOC": 8})
    dictionary["metrics"]["method"] = "conll2003_dictionary"
    report = {
        "evaluation_set": {
            "snapshot_id": "snap-1",
            "split": "test",
            "items": ITEMS,
            "sha256": item_ids_sha256(item_ids),
        },
        "labels": LABELS,
        "item_ids": item_ids,
        "y_true": [0] * ITEMS,
        "candidate": scored(
            candidate, run_id=payload["run_id"], model_sha256=payload["artifacts"]["model.onnx"]["sha256"]
        ),
        "production": production,
        "production_error": None,
        "baselines": {"majority": scored(dict.fromkeys(LABELS, 0)), "classical": dictionary},
        "input_stats": None,
        **report_fields,
    }
    report["baseline_lift"] = report["candidate"]["metrics"]["entity_f1"] - dictionary["metrics"]["entity_f1"]
    assert EvaluationReport().validate(report) == {}
    key = f"{model_run_prefix(TENANT, MODEL, payload['run_id'])}/evaluation.json"
    info = runs.storage.put(MODELS_BUCKET, key, json.dumps(report).encode())
    payload["evaluation"] = {"bucket": MODELS_BUCKET, "key": info.key, "sha256": info.sha256}
    return payload


def get(registry: Any, path: str) -> dict[str, Any]:
    response = registry.client.get(path, query_string={"tenant": TENANT}, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def production_answers(registry: Any, found: dict[str, int]) -> dict[str, Any]:
    model = get(registry, f"/v1/models/{MODEL}")
    version = get(registry, f"/v1/models/{MODEL}/versions/{model['aliases']['production']['version']}")
    return scored(
        found,
        version=version["version"],
        run_id=version["run_id"],
        model_sha256=version["artifacts"]["model.onnx"]["sha256"],
    )


def decision_of(registry: Any, version: int) -> dict[str, Any]:
    return get(registry, f"/v1/models/{MODEL}/versions/{version}")["decision"]


def test_a_token_model_is_gated_on_entity_f1_and_guarded_per_entity_type(registry, runs) -> None:
    first = {"PER": 60, "ORG": 60, "LOC": 60}
    assert deliver(registry.runtime, TENANT, token_run(runs, first, None)) == "handled"
    model = get(registry, f"/v1/models/{MODEL}")
    assert model["policy"]["primary_metric"] == "entity_f1"
    assert model["aliases"]["production"]["version"] == 1
    decided = decision_of(registry, 1)
    assert decided["candidate"]["metrics"]["entity_f1"] == pytest.approx(0.75)
    assert decided["baseline_lift"] == pytest.approx(0.75 - 0.1)

    # Better overall (0.75 -> 0.85), credibly, but ORG falls from 0.75 to 0.5625: the per-type guard refuses it.
    better_but_org = {"PER": 80, "ORG": 45, "LOC": 79}
    payload = token_run(runs, better_but_org, production_answers(registry, first))
    assert deliver(registry.runtime, TENANT, payload) == "handled"
    decided = decision_of(registry, 2)
    assert decided["outcome"] == "staging"
    assert decided["difference"]["metric"] == "entity_f1"
    assert decided["difference"]["value"] == pytest.approx(204 / 240 - 0.75)
    assert decided["difference"]["ci_low"] > 0
    conditions = {condition["name"]: condition for condition in decided["conditions"]}
    assert conditions["margin"]["passed"] and conditions["credible_improvement"]["passed"]
    guard = conditions["class_regression"]
    assert not guard["passed"] and guard["worst_class"] == "ORG"
    assert guard["observed"] == pytest.approx(0.75 - 45 / 80)
    assert "entity type 'ORG'" in guard["detail"]
    assert get(registry, f"/v1/models/{MODEL}")["aliases"]["production"]["version"] == 1

    # Better on every type: promoted.
    payload = token_run(runs, {"PER": 75, "ORG": 70, "LOC": 72}, production_answers(registry, first))
    assert deliver(registry.runtime, TENANT, payload) == "handled"
    decided = decision_of(registry, 3)
    assert decided["outcome"] == "production", decided["reason"]
    assert "v3 passes every condition against production v1" in decided["reason"]
    assert get(registry, f"/v1/models/{MODEL}")["aliases"]["production"]["version"] == 3


def test_a_token_report_whose_entity_f1_disagrees_with_its_counts_is_not_promoted_on(registry, runs) -> None:
    payload = token_run(runs, {"PER": 60, "ORG": 60, "LOC": 60}, None)
    report = json.loads(runs.storage.get_bytes(MODELS_BUCKET, payload["evaluation"]["key"]))
    report["candidate"]["metrics"]["entity_f1"] = 0.95
    info = runs.storage.put(MODELS_BUCKET, payload["evaluation"]["key"], json.dumps(report).encode())
    payload["evaluation"]["sha256"] = info.sha256
    assert deliver(registry.runtime, TENANT, payload) == "handled"
    decided = decision_of(registry, 1)
    assert decided["outcome"] == "staging"
    assert "disagrees with its own entity counts (0.7500)" in decided["reason"]


def test_the_policy_takes_entity_f1_for_token_models_only(registry, runs) -> None:
    assert deliver(registry.runtime, TENANT, token_run(runs, {"PER": 60, "ORG": 60, "LOC": 60}, None)) == "handled"
    assert deliver(registry.runtime, TENANT, runs(TENANT, "reviews-clf")) == "handled"

    def put_policy(model: str, metric: str) -> Any:
        body = {"tenant": TENANT, "primary_metric": metric}
        return registry.client.put(f"/v1/models/{model}/policy", json=body, headers=INTERNAL)

    refused = put_policy(MODEL, "macro_f1")
    assert refused.status_code == 422
    error = refused.get_json()["error"]
    assert "token_classification model is compared on entity_f1" in json.dumps(error["details"])
    assert put_policy("reviews-clf", "entity_f1").status_code == 422
    assert put_policy(MODEL, "entity_f1").status_code == 200
    assert put_policy("reviews-clf", "accuracy").get_json()["policy"]["primary_metric"] == "accuracy"
    assert get(registry, "/v1/models/reviews-clf")["policy"]["primary_metric"] == "accuracy"
