"""Span labeling of token-classification datasets through the annotation queue: leases, spans with code-point
offsets, entity-level consensus and escalation, validation, partner spans, snapshots and exports, tenancy."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from flask import Flask, jsonify, request

from shared.storage import ObjectStore
from tests.conftest import serve
from tests.helpers import INTERNAL, bearer, create_dataset, create_partner, eventually

pytestmark = pytest.mark.timeout(120)

LABELS = ["PER", "ORG", "LOC"]
# Accents (composed and combining), an emoji with a skin-tone modifier, a flag and CJK: offsets are code points.
TEXT = (
    "Zo\u00eb \U0001f44d\U0001f3fd met Jose\u0301 at Caf\u00e9 \u00dcn\u00efcorn \U0001f1eb\U0001f1f7 in \u6771\u4eac."
)
ZOE = {"start": 0, "end": 3, "label": "PER"}
JOSE = {"start": TEXT.index("Jose"), "end": TEXT.index("Jose") + 5, "label": "PER"}  # J o s e + U+0301
CAFE = {"start": TEXT.index("Caf\u00e9"), "end": TEXT.index("Caf\u00e9") + 12, "label": "ORG"}
TOKYO = {"start": TEXT.index("\u6771\u4eac"), "end": TEXT.index("\u6771\u4eac") + 2, "label": "LOC"}


def text_of(span: dict[str, Any], text: str = TEXT) -> str:
    return text[span["start"] : span["end"]]


def span_dataset(harness, **fields: Any) -> str:
    return harness.dataset(name="news", task_type="token_classification", labels=LABELS, **fields)


def push(harness, dataset: str, items: list[dict[str, Any]], key: str | None = None) -> list[str]:
    response = harness.ingestion.client.post(
        f"/v1/datasets/{dataset}/items", json={"items": items}, headers=bearer(key or harness.key)
    )
    assert response.status_code == 200, response.get_json()
    assert all(i["status"] != "rejected" for i in response.get_json()["items"]), response.get_json()
    return [i["item_id"] for i in response.get_json()["items"]]


def mark(harness, headers: dict[str, str], task_id: int, spans: list[dict[str, Any]]) -> Any:
    return harness.labeling.client.post(f"/v1/tasks/{task_id}/annotations", json={"spans": spans}, headers=headers)


def tasks_of(harness, dataset: str) -> list[dict[str, Any]]:
    return harness.labeling.client.get(f"/v1/datasets/{dataset}/tasks", headers=harness.partner).get_json()["tasks"]


def stats_of(harness, dataset: str) -> dict[str, Any]:
    return harness.labeling.client.get(f"/v1/datasets/{dataset}/stats", headers=harness.partner).get_json()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_annotators_agree_and_the_snapshot_carries_the_consensus_spans(
    harness_factory, postgres_database, backend: str
) -> None:
    harness = harness_factory(**({"database_url": postgres_database()} if backend == "postgresql" else {}))
    assert (
        text_of(JOSE) == "Jose\u0301"
        and text_of(CAFE) == "Caf\u00e9 \u00dcn\u00efcorn"
        and text_of(TOKYO) == "\u6771\u4eac"
    )
    dataset = span_dataset(harness, overlap=2)
    push(harness, dataset, [{"text": TEXT}])
    harness.wait_tasks(dataset, 1)
    alice, bob = harness.annotator("alice", dataset), harness.annotator("bob", dataset)

    task = harness.next(alice, dataset)
    assert task["text"] == TEXT and task["labels"] == LABELS and task["task_type"] == "token_classification"
    assert task["prelabel_spans"] is None and task["consensus_spans"] is None
    first = mark(harness, alice, task["id"], [TOKYO, ZOE, CAFE, JOSE])  # any order; stored in text order
    assert first.status_code == 201, first.get_json()
    assert first.get_json()["spans"] == [ZOE, JOSE, CAFE, TOKYO] and first.get_json()["task_status"] == "open"
    assert first.get_json()["label"] is None

    assert harness.next(bob, dataset)["id"] == task["id"]
    second = mark(harness, bob, task["id"], [ZOE, JOSE, CAFE, TOKYO]).get_json()
    assert second["task_status"] == "done" and second["consensus_spans"] == [ZOE, JOSE, CAFE, TOKYO]
    (listed,) = tasks_of(harness, dataset)
    assert listed["consensus_spans"] == [ZOE, JOSE, CAFE, TOKYO] and listed["consensus_label"] is None
    assert listed["agreement"] == 1.0 and listed["consensus_source"] == "vote"

    stats = stats_of(harness, dataset)
    assert stats["entity_f1"] == 1.0 and stats["items_in_entity_f1"] == 1
    assert stats["label_counts"] == {"PER": 2, "ORG": 1, "LOC": 1}
    assert [a["agreement_with_consensus"] for a in stats["annotators"]] == [1.0, 1.0]

    snapshot = harness.labeling.client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner)
    assert snapshot.status_code == 201, snapshot.get_json()
    assert snapshot.get_json()["item_count"] == 1
    assert snapshot.get_json()["label_counts"] == {"PER": 2, "ORG": 1, "LOC": 1}
    export = harness.labeling.client.get(f"/v1/snapshots/{snapshot.get_json()['id']}/export", headers=harness.partner)
    (row,) = [json.loads(line) for line in export.get_data(as_text=True).splitlines()]
    assert row["text"] == TEXT and row["spans"] == [ZOE, JOSE, CAFE, TOKYO]
    assert [text_of(span, row["text"]) for span in row["spans"]] == [
        "Zo\u00eb",
        "Jose\u0301",
        "Caf\u00e9 \u00dcn\u00efcorn",
        "\u6771\u4eac",
    ]
    as_csv = harness.labeling.client.get(
        f"/v1/snapshots/{snapshot.get_json()['id']}/export?format=csv", headers=harness.partner
    )
    (csv_row,) = list(csv.DictReader(io.StringIO(as_csv.get_data(as_text=True))))
    assert csv_row["text"] == TEXT and json.loads(csv_row["spans"]) == [ZOE, JOSE, CAFE, TOKYO]


def test_disagreement_on_an_entity_escalates_to_a_third_annotator(harness) -> None:
    dataset = span_dataset(harness, overlap=2)
    push(harness, dataset, [{"text": TEXT}])
    harness.wait_tasks(dataset, 1)
    answers = []
    for name, spans in (("alice", [ZOE]), ("bob", [ZOE, CAFE]), ("carol", [ZOE, CAFE])):
        person = harness.annotator(name, dataset)
        task = harness.next(person, dataset)
        assert task is not None, f"{name} should get the task"
        answers.append(mark(harness, person, task["id"], spans).get_json())
        if name == "bob":
            (listed,) = tasks_of(harness, dataset)
            assert listed["status"] == "open" and listed["required"] == 3, "Café marked by one of two: a tie"
    assert [a["task_status"] for a in answers] == ["open", "open", "done"]
    assert answers[-1]["consensus_spans"] == [ZOE, CAFE]
    (listed,) = tasks_of(harness, dataset)
    assert listed["agreement"] == pytest.approx((3 + 2) / 6)
    stats = stats_of(harness, dataset)
    assert stats["entity_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)
    assert sorted(a["agreement_with_consensus"] for a in stats["annotators"]) == [0.0, 1.0, 1.0]


def test_a_tie_at_the_ceiling_goes_to_review_and_the_owner_decides_spans(harness) -> None:
    dataset = span_dataset(harness, overlap=2)
    patched = harness.labeling.client.patch(
        f"/v1/datasets/{dataset}/settings", json={"max_extra_annotations": 0}, headers=harness.partner
    )
    assert patched.status_code == 200
    push(harness, dataset, [{"text": TEXT}])
    harness.wait_tasks(dataset, 1)
    for name, spans in (("alice", [ZOE]), ("bob", [])):
        person = harness.annotator(name, dataset)
        last = mark(harness, person, harness.next(person, dataset)["id"], spans).get_json()
    assert last["task_status"] == "review"
    task_id = last["task_id"]
    refused = harness.labeling.client.post(
        f"/v1/tasks/{task_id}/resolve", json={"label": "PER"}, headers=harness.partner
    )
    assert refused.status_code == 422 and "label" in refused.get_json()["error"]["details"]["fields"]
    resolved = harness.labeling.client.post(
        f"/v1/tasks/{task_id}/resolve", json={"spans": [ZOE, TOKYO]}, headers=harness.partner
    )
    assert resolved.status_code == 200, resolved.get_json()
    assert resolved.get_json()["consensus_spans"] == [ZOE, TOKYO]
    assert resolved.get_json()["consensus_source"] == "review"


def test_bad_spans_answer_422_naming_the_field_and_nothing_is_recorded(harness) -> None:
    dataset = span_dataset(harness, overlap=1)
    push(harness, dataset, [{"text": TEXT}])
    harness.wait_tasks(dataset, 1)
    alice = harness.annotator("alice", dataset)
    task_id = harness.next(alice, dataset)["id"]
    thumb = TEXT.index("\U0001f44d")
    cases = [
        ([{"start": 0, "end": len(TEXT) + 1, "label": "PER"}], "0", "end", "past the end"),
        ([{"start": 3, "end": 3, "label": "PER"}], "0", "start", "less than end"),
        ([ZOE, {"start": 1, "end": 4, "label": "ORG"}], "1", "start", "overlaps span 0"),
        ([{"start": thumb, "end": thumb + 1, "label": "PER"}], "0", "end", "cuts a character"),  # 👍 without 🏽
        ([{"start": JOSE["start"], "end": JOSE["end"] - 1, "label": "PER"}], "0", "end", "cuts a character"),
        ([ZOE | {"label": "COMPANY"}], "0", "label", "entity labels"),
        ([{"start": -1, "end": 3, "label": "PER"}], "0", "start", ""),
    ]
    for spans, index, field, words in cases:
        response = mark(harness, alice, task_id, spans)
        assert response.status_code == 422, (spans, response.get_json())
        fields = response.get_json()["error"]["details"]["fields"]
        fields = fields.get("json", fields)  # a type or range error comes from the request schema, under `json`
        assert words in " ".join(fields["spans"][index][field]), (spans, fields)
    as_label = harness.label(alice, task_id, "PER")
    assert as_label.status_code == 422 and "token_classification" in as_label.get_json()["error"]["message"]
    assert "label" in as_label.get_json()["error"]["details"]["fields"]
    both = harness.labeling.client.post(
        f"/v1/tasks/{task_id}/annotations", json={"label": "PER", "spans": []}, headers=alice
    )
    assert both.status_code == 422 and both.get_json()["error"]["code"] == "validation_failed"
    none = harness.labeling.client.post(f"/v1/tasks/{task_id}/annotations", json={}, headers=alice)
    assert none.status_code == 422
    assert (tasks_of(harness, dataset)[0]["status"], stats_of(harness, dataset)["annotators"]) == ("open", [])
    accepted = mark(harness, alice, task_id, [])
    assert accepted.status_code == 201, "the refused answers left nothing behind: this is her first annotation"
    assert accepted.get_json()["task_status"] == "done" and accepted.get_json()["consensus_spans"] == []


def test_spans_are_refused_on_a_classification_dataset(harness) -> None:
    dataset = harness.dataset(overlap=1)
    harness.push(dataset, ["a fine film"])
    harness.wait_tasks(dataset, 1)
    alice = harness.annotator("alice", dataset)
    task = harness.next(alice, dataset)
    assert task["task_type"] == "text_classification" and task["consensus_spans"] is None
    refused = mark(harness, alice, task["id"], [{"start": 0, "end": 1, "label": "pos"}])
    assert refused.status_code == 422 and "spans" in refused.get_json()["error"]["details"]["fields"]
    assert "label" in refused.get_json()["error"]["message"]
    assert harness.label(alice, task["id"], "pos").status_code == 201


def test_partner_spans_count_as_the_partners_annotation(harness) -> None:
    dataset = span_dataset(harness, overlap=2)
    labeled, no_entity, unlabeled = push(
        harness,
        dataset,
        [{"text": TEXT, "spans": [CAFE, ZOE]}, {"text": "nothing to see here", "spans": []}, {"text": "Ana"}],
    )
    harness.wait_tasks(dataset, 3)
    alice = harness.annotator("alice", dataset)
    seen = {}
    for _ in range(3):
        task = harness.next(alice, dataset)
        seen[task["item_id"]] = task
        spans = [ZOE, CAFE] if task["item_id"] == labeled else []
        answer = mark(harness, alice, task["id"], spans).get_json()
        seen[task["item_id"]] = answer
    assert seen[labeled]["task_status"] == "done" and seen[labeled]["consensus_spans"] == [ZOE, CAFE]
    assert seen[no_entity]["task_status"] == "done" and seen[no_entity]["consensus_spans"] == []
    assert seen[unlabeled]["task_status"] == "open", "an item pushed without spans waits for a second annotator"
    stats = stats_of(harness, dataset)
    assert stats["items_in_entity_f1"] == 2 and stats["entity_f1"] == 1.0
    assert {a["annotator_id"] for a in stats["annotators"]} == {"partner", seen[labeled]["annotator_id"]}


def test_another_tenants_annotator_cannot_see_the_task(harness) -> None:
    dataset = span_dataset(harness, overlap=1)
    push(harness, dataset, [{"text": TEXT}])
    harness.wait_tasks(dataset, 1)
    alice = harness.annotator("alice", dataset)
    task_id = harness.next(alice, dataset)["id"]

    globex = create_partner(harness.ingestion.client, "globex")
    theirs = create_dataset(
        harness.ingestion.client, globex["api_key"], task_type="token_classification", labels=LABELS
    )
    eventually(
        lambda: (
            harness.labeling.client.get(f"/v1/datasets/{theirs['id']}", headers=bearer(globex["api_key"])).status_code
            == 200
        ),
        what="labeling to learn of globex's dataset",
    )
    issued = harness.labeling.client.post(
        "/v1/annotators",
        json={"tenant": globex["partner"]["id"], "name": "mallory", "datasets": [theirs["id"]]},
        headers=INTERNAL,
    )
    mallory = bearer(issued.get_json()["token"])
    client = harness.labeling.client
    assert client.get(f"/v1/datasets/{dataset}/tasks/next", headers=mallory).status_code == 404
    assert mark(harness, mallory, task_id, [ZOE]).status_code == 404
    assert client.post(f"/v1/tasks/{task_id}/skip", headers=mallory).status_code == 404
    assert client.get(f"/v1/tasks/{task_id}/content", headers=mallory).status_code == 404
    me = client.get("/v1/annotators/me", headers=mallory).get_json()
    assert [d["dataset_id"] for d in me["datasets"]] == [theirs["id"]]
    assert tasks_of(harness, dataset)[0]["status"] == "open", "nothing of mallory's reached alice's task"


def fake_token_inference(store: ObjectStore) -> Flask:
    """Speaks inference's predict API for a token model: reads each referenced item and answers its capitalised
    words as entities, `PER` first then `LOC`, plus a `DATE` the dataset does not know; a word's score is its
    length over ten (so short names are the least sure)."""
    app = Flask("fake-token-inference")

    @app.post("/v1/models/<name>:predict")
    def predict(name: str):
        predictions = []
        for reference in request.get_json()["references"]:
            text = store.get_range(reference["bucket"], reference["key"], reference["offset"], reference["length"])
            text = text.decode()
            found, position = [], 0
            for word in text.split(" "):
                if word[:1].isupper():
                    label = "PER" if not found else "LOC"
                    found.append({"start": position, "end": position + len(word), "label": label})
                    found[-1] |= {"score": len(word) / 10, "text": word}
                position += len(word) + 1
            found.append({"start": 0, "end": 1, "label": "DATE", "score": 0.01, "text": text[0]})
            predictions.append({"prediction_id": None, "entities": found})
        return jsonify(model_name=name, model_version=4, predictions=predictions)

    return app


def test_a_token_models_entities_are_pre_label_spans_and_order_the_queue(harness_factory, store) -> None:
    url, stop = serve(fake_token_inference(store))
    try:
        harness = harness_factory(inference_url=url)
        dataset = span_dataset(harness, overlap=1)
        sure, unsure = push(harness, dataset, [{"text": "Augustina visited Barcelona"}, {"text": "Al visited Rome"}])
        harness.wait_tasks(dataset, 2)
        harness.promote(dataset, model="news", version=4)

        def prelabeled() -> list[dict[str, Any]] | None:
            tasks = tasks_of(harness, dataset)
            return tasks if all(t["prelabel_spans"] is not None for t in tasks) else None

        by_item = {t["item_id"]: t for t in eventually(prelabeled, what="pre-label spans from inference")}
        assert by_item[unsure]["prelabel_spans"] == [
            {"start": 0, "end": 2, "label": "PER"},
            {"start": 11, "end": 15, "label": "LOC"},
        ], "the DATE entity is not one of the dataset's labels"
        assert by_item[unsure]["prelabel_confidence"] == pytest.approx(0.2)
        assert by_item[sure]["prelabel_confidence"] == pytest.approx(0.9)
        assert by_item[sure]["prelabel_version"] == 4 and by_item[sure]["status"] == "open"
        alice = harness.annotator("alice", dataset)
        first = harness.next(alice, dataset)
        assert first["item_id"] == unsure, "the least confident entity first"
        assert first["prelabel_spans"] == by_item[unsure]["prelabel_spans"]
    finally:
        stop()


def test_span_feedback_becomes_a_span_task_prelabeled_with_the_corrected_spans(harness) -> None:
    dataset = span_dataset(harness)
    stored = harness.ingestion.runtime.storage.put("raw", f"{harness.tenant}/predictions/p1.txt", TEXT.encode())
    feedback = {
        "prediction_id": "prd_span1",
        "model_name": "news",
        "model_version": 2,
        "dataset_id": dataset,
        "input": {"bucket": "raw", "key": stored.key, "sha256": stored.sha256},
        "predicted_label": None,
        "correct_label": None,
        "confidence": 0.6,
        "predicted_spans": [ZOE],
        "correct_spans": [CAFE, ZOE, JOSE],
    }
    harness.send("prediction.feedback", feedback)
    harness.send("prediction.feedback", feedback)  # a redelivery (another event id): still one task
    beyond = {"start": TOKYO["start"], "end": len(TEXT) + 1, "label": "LOC"}
    harness.send("prediction.feedback", feedback | {"prediction_id": "prd_span2", "correct_spans": [ZOE, beyond]})
    unknown = {**ZOE, "label": "DATE"}
    harness.send("prediction.feedback", feedback | {"prediction_id": "prd_span3", "correct_spans": [unknown]})
    as_label = {"prediction_id": "prd_span4", "correct_spans": None, "correct_label": "PER"}
    harness.send("prediction.feedback", feedback | as_label)

    def dead_letters():
        found = harness.labeling.client.get("/v1/admin/dead-letters", headers=INTERNAL).get_json()["dead_letters"]
        return found if len(found) >= 3 else None

    # The worker's first feedback builds the PII analyzer (its policy lookup fails closed here): be patient.
    errors = sorted(letter["error"] for letter in eventually(dead_letters, timeout=90, what="three dead letters"))
    assert any("past the end of the text" in error for error in errors)
    assert any("'DATE' is not one of the dataset's entity labels" in error for error in errors)
    assert any("a class label for token_classification dataset" in error for error in errors)
    eventually(lambda: harness.task_count(dataset) >= 1, timeout=90, what="the feedback task")
    assert harness.task_count(dataset) == 1
    alice = harness.annotator("alice", dataset)
    task = harness.next(alice, dataset)
    assert task["source"] == "feedback" and task["priority"] >= 100 and task["task_type"] == "token_classification"
    assert task["text"] == TEXT and task["prelabel"] is None
    assert task["prelabel_spans"] == [ZOE, JOSE, CAFE]
    assert task["feedback"] == {
        "prediction_id": "prd_span1",
        "correct_spans": [ZOE, JOSE, CAFE],
        "predicted_spans": [ZOE],
    }
    assert mark(harness, alice, task["id"], [ZOE, JOSE, CAFE]).status_code == 201
