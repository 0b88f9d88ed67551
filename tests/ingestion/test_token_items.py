"""token_classification datasets: texts with entity spans, as a partner pushes, imports and reads them back."""

from __future__ import annotations

import json

import pytest

from tests.helpers import create_dataset, eventually
from tests.ingestion.test_push import download, outbox_events

ENTITIES = ["PER", "ORG", "LOC"]

# Accents (precomposed and combining), emoji outside the BMP (one code point, two UTF-16 units), a skin-tone
# sequence, CJK: code point offsets must name the same characters after storage as before.
TEXTS = [
    ("Zoë Ruiz-Peña joined Café Ünïcorn in São Paulo.", ["Zoë Ruiz-Peña", "Café Ünïcorn", "São Paulo"]),
    ("🚀 Ada Lovelace 👍🏽 met 🇫🇷 Renault in Paris", ["Ada Lovelace", "Renault", "Paris"]),
    ("山田太郎はトヨタ自動車で東京に勤めています", ["山田太郎", "トヨタ自動車", "東京"]),
    ("Rene\u0301 Dubois left ACME for Zu\u0308rich 😀", ["Rene\u0301 Dubois", "ACME", "Zu\u0308rich"]),
]


def spans_of(text: str, entities: list[str]) -> list[dict]:
    spans, position = [], 0
    for entity, label in zip(entities, ENTITIES, strict=True):
        start = text.index(entity, position)
        position = start + len(entity)
        spans.append({"start": start, "end": position, "label": label})
    return spans


@pytest.fixture
def ner(tenant) -> dict:
    return create_dataset(
        tenant.service.client, tenant.key, name="entities", task_type="token_classification", labels=ENTITIES
    )


def test_offsets_survive_the_round_trip_with_accents_emoji_and_cjk(tenant, ner) -> None:
    items = [{"text": text, "spans": spans_of(text, entities)} for text, entities in TEXTS]
    items.append({"text": "nothing to see here"})  # unlabeled: no spans at all
    items.append({"text": "no entity in this one", "spans": []})  # labeled: no entities
    response = tenant.push(ner["id"], items)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["accepted"] == len(items), body
    for result, (text, entities) in zip(body["items"], TEXTS, strict=False):
        item = tenant.service.client.get(f"/v1/items/{result['item_id']}", headers=tenant.headers).get_json()
        stored = download(tenant, result["item_id"]).decode("utf-8")
        assert stored == text
        assert [stored[s["start"] : s["end"]] for s in item["spans"]] == entities
        assert [s["label"] for s in item["spans"]] == ENTITIES and item["label"] is None
    unlabeled, empty = (
        tenant.service.client.get(f"/v1/items/{r['item_id']}", headers=tenant.headers).get_json()
        for r in body["items"][-2:]
    )
    assert unlabeled["spans"] is None and empty["spans"] == []
    [event] = outbox_events(tenant.service, "item.ingested")
    assert event["payload"]["dataset"]["task_type"] == "token_classification"
    sent = event["payload"]["items"]
    assert [item.get("spans") for item in sent] == [*(spans_of(t, e) for t, e in TEXTS), None, []]


@pytest.mark.parametrize(
    ("text", "span", "field", "message"),
    [
        ("Ada Lovelace", {"start": 4, "end": 4, "label": "PER"}, "start", "must be less than end"),
        ("Ada Lovelace", {"start": 9, "end": 3, "label": "PER"}, "start", "must be less than end"),
        ("Ada Lovelace", {"start": 0, "end": 13, "label": "PER"}, "end", "past the end of the text"),
        ("Rene\u0301 Dubois", {"start": 0, "end": 4, "label": "PER"}, "end", "cuts a character"),
        ("hi 👍🏽 Ada", {"start": 4, "end": 8, "label": "PER"}, "start", "cuts a character"),
        ("flag 🇫🇷 Paris", {"start": 6, "end": 13, "label": "LOC"}, "start", "cuts a character"),
        ("Ada Lovelace", {"start": -1, "end": 3, "label": "PER"}, "start", "greater than or equal to 0"),
        ("Ada Lovelace", {"start": 0, "label": "PER"}, "end", "Missing data"),
    ],
)
def test_a_bad_span_is_a_422_naming_its_field(tenant, ner, text, span, field, message) -> None:
    response = tenant.push(ner["id"], [{"text": "a fine first item", "spans": []}, {"text": text, "spans": [span]}])
    assert response.status_code == 422, response.get_json()
    details = response.get_json()["error"]["details"]["fields"]
    [reason] = details["items"]["1"]["spans"]["0"][field]
    assert message in reason
    assert "0" not in details["items"]
    listed = tenant.service.client.get(f"/v1/datasets/{ner['id']}/items", headers=tenant.headers).get_json()
    assert listed["items"] == []  # nothing half-written


def test_overlapping_spans_are_a_422_naming_the_later_one(tenant, ner) -> None:
    spans = [{"start": 4, "end": 12, "label": "PER"}, {"start": 0, "end": 7, "label": "ORG"}]
    response = tenant.push(ner["id"], [{"text": "Ada Lovelace", "spans": spans}])
    assert response.status_code == 422
    [reason] = response.get_json()["error"]["details"]["fields"]["items"]["0"]["spans"]["0"]["start"]
    assert reason == "overlaps span 1 (0-7)"


def test_labels_must_fit_the_dataset_or_the_item_is_rejected(tenant, ner) -> None:
    response = tenant.push(
        ner["id"],
        [
            {"text": "Ada works at ACME", "spans": [{"start": 0, "end": 3, "label": "PER"}]},
            {"text": "Ada works at Initech", "spans": [{"start": 13, "end": 20, "label": "COMPANY"}]},
            {"text": "a label instead of spans", "label": "PER"},
        ],
    )
    assert response.status_code == 200
    accepted, unknown, labeled = response.get_json()["items"]
    assert accepted["status"] == "accepted"
    assert unknown["status"] == "rejected"
    assert unknown["reason"] == "spans.0.label: 'COMPANY' is not in the dataset's label set"
    assert labeled["status"] == "rejected" and labeled["reason"].startswith("label:")
    classified = tenant.push(tenant.text["id"], [{"text": "good", "spans": [{"start": 0, "end": 4, "label": "pos"}]}])
    [result] = classified.get_json()["items"]
    assert result["status"] == "rejected" and "only token_classification datasets" in result["reason"]


def test_spans_are_refused_when_pii_redaction_would_move_them(tenant) -> None:
    redacting = create_dataset(
        tenant.service.client,
        tenant.key,
        name="redacted",
        task_type="token_classification",
        labels=ENTITIES,
        pii_policy="redact",
    )
    text = "Mail ada@example.com to Ada Lovelace"
    response = tenant.push(
        redacting["id"],
        [
            {"text": text, "spans": [{"start": 24, "end": 36, "label": "PER"}]},
            {"text": "Ada Lovelace has no PII", "spans": [{"start": 0, "end": 12, "label": "PER"}]},
        ],
    )
    moved, kept = response.get_json()["items"]
    assert moved["status"] == "rejected" and "PII redaction changed the text" in moved["reason"]
    assert kept["status"] == "accepted"


def upload(tenant, dataset_id: str, body: bytes, content_type: str):
    return tenant.service.client.post(
        f"/v1/datasets/{dataset_id}/imports", data=body, headers=tenant.headers, content_type=content_type
    )


def finished(tenant, import_id: str) -> dict:
    def probe():
        record = tenant.service.client.get(f"/v1/imports/{import_id}", headers=tenant.headers).get_json()
        return record if record["status"] in {"succeeded", "failed"} else None

    return eventually(probe, timeout=120, interval=0.25, what=f"import {import_id}")


def item_spans(tenant, dataset_id: str) -> dict[str, list[str]]:
    listed = tenant.service.client.get(f"/v1/datasets/{dataset_id}/items", headers=tenant.headers).get_json()
    seen = {}
    for item in listed["items"]:
        text = download(tenant, item["id"]).decode("utf-8")
        seen[text] = [f"{s['label']}:{text[s['start'] : s['end']]}" for s in item["spans"]]
    return seen


@pytest.mark.timeout(180)
def test_jsonl_and_conll_imports_carry_spans(tenant, ner, worker) -> None:
    text, entities = TEXTS[1]
    lines = [
        json.dumps({"text": text, "spans": spans_of(text, entities)}),
        json.dumps({"text": "Bob", "spans": [{"start": 0, "end": 9, "label": "PER"}]}),
        json.dumps({"text": "Bob at Initech", "spans": [{"start": 7, "end": 14, "label": "COMPANY"}]}),
    ]
    jsonl = upload(tenant, ner["id"], ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
    assert jsonl.status_code == 202, jsonl.get_json()
    conll = "\n".join(
        [
            "-DOCSTART- O",
            "",
            "Jean B-PER",
            "Dupont I-PER",
            "rejoint O",
            "Ünïcorn B-ORG",
            "à O",
            "Zürich B-LOC",
            "",
            "東京 B-LOC",
            "に O",
            "行く O",
            "",
            "broken",
            "",
            "Marie B-PER",
            "Curie I-PER",
            "",
        ]
    )
    imported = upload(tenant, ner["id"], conll.encode(), "text/x-conll")
    assert imported.status_code == 202, imported.get_json()
    with worker("ingestion"):
        jsonl_done = finished(tenant, jsonl.get_json()["id"])
        conll_done = finished(tenant, imported.get_json()["id"])
    assert (jsonl_done["accepted"], jsonl_done["rejected"]) == (1, 2), jsonl_done
    errors = {error["line"]: error["error"] for error in jsonl_done["errors"]}
    assert "past the end of the text" in errors[2] and "'COMPANY' is not in the dataset's label set" in errors[3]
    assert (conll_done["total"], conll_done["accepted"], conll_done["rejected"]) == (4, 3, 1), conll_done
    assert conll_done["errors"] == [
        {"line": 14, "error": "line 14: expected 'token tag' with a tag O, B-<label> or I-<label>"}
    ]
    assert item_spans(tenant, ner["id"]) == {
        text: ["PER:Ada Lovelace", "ORG:Renault", "LOC:Paris"],
        "Jean Dupont rejoint Ünïcorn à Zürich": ["PER:Jean Dupont", "ORG:Ünïcorn", "LOC:Zürich"],
        "東京 に 行く": ["LOC:東京"],
        "Marie Curie": ["PER:Marie Curie"],
    }


def test_conll_is_only_for_token_classification(tenant) -> None:
    response = upload(tenant, tenant.text["id"], b"Ada B-PER\n", "text/x-conll")
    assert response.status_code == 422
    assert "token_classification" in response.get_json()["error"]["message"]
