"""Feedback that corrects entity spans, end to end: a token model's `:predict` answers are logged with their
entities and get prediction ids; `POST /v1/feedback {prediction_id, spans}` is checked against the logged text and
the model's entity labels and emits `prediction.feedback` with the corrected spans; labeling's worker turns it into
a span task pre-labeled with them. With the dataset's PII policy on, the logged text is redacted and the logged
entities, the event's spans and the task's pre-labels all point at the right characters of the redacted text.

The token model is an untrained MiniLM tagger whose zero head favours `B-PER`: every word the tokenizer sees is
one PER entity, which pins the offsets (tests/inference/test_token_serving.py serves the same one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from services.training.base_models import MINILM
from services.training.text_model import load_encoder
from services.training.token_export import export_token_model
from services.training.token_model import TokenTagger, tag_set
from tests.helpers import INTERNAL, bearer, eventually
from tests.inference.support import serving_document, upload_version
from tests.inference.test_feedback import queued_events, stored_input

pytestmark = pytest.mark.timeout(240)

LABELS = ["PER", "ORG", "LOC"]
TAGS = tag_set(LABELS)
MAX_LENGTH = 48
TEXT = "Zoë Ruiz joined Acme in Paris"
WORDS = ["Zoë", "Ruiz", "joined", "Acme", "in", "Paris"]
ZOE_RUIZ = {"start": 0, "end": 8, "label": "PER"}
ACME = {"start": 16, "end": 20, "label": "ORG"}
PARIS = {"start": 24, "end": 29, "label": "LOC"}
PII_TEXT = "Zoë Ruiz wrote to jane.doe@example.com from Paris"
PII_REDACTED = "Zoë Ruiz wrote to [EMAIL] from Paris"


@pytest.fixture(scope="module")
def tagger_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The every-word tagger's ONNX package (no training: a zero head whose bias favours B-PER)."""
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(MINILM)
    tagger = TokenTagger(encoder, len(TAGS), dropout=0.1, freeze_encoder=False).eval()
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.fill_(-5.0)
        tagger.head.bias[TAGS.index("B-PER")] = 5.0
    folder = tmp_path_factory.mktemp("span-feedback") / "words"
    export_token_model(
        tagger,
        tokenizer,
        TAGS,
        LABELS,
        MAX_LENGTH,
        folder,
        [TEXT, PII_TEXT],
        model_name="words",
        metrics={},
        lineage={},
    )
    return folder


def token_dataset(tenants, pii_policy: str = "off") -> str:
    response = requests.post(
        f"{tenants.ingestion_url}/v1/datasets",
        json={"name": "news", "task_type": "token_classification", "labels": LABELS, "pii_policy": pii_policy},
        headers=tenants.alice.headers,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def serve(store, registry, tenants, folder: Path, dataset_id: str) -> str:
    """Alice's model in `folder`, trained (as the registry says) on `dataset_id`; returns its name."""
    document = serving_document(
        tenants.alice.tenant, folder, {1: upload_version(store, tenants.alice.tenant, folder, 1)}, 1
    )
    registry.serve({**document, "dataset_id": dataset_id})
    return json.loads((folder / "metadata.json").read_text())["model_name"]


def predict(replica, headers, name: str, texts: list[str]) -> list[dict[str, Any]]:
    response = replica.client.post(f"/v1/models/{name}:predict", json={"texts": texts}, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["predictions"]


def feedback(replica, headers, body: dict[str, Any]):
    return replica.client.post("/v1/feedback", json=body, headers=headers)


def feedback_events(settings) -> list[dict[str, Any]]:
    return [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "prediction.feedback"]


def labeling_knows(platform, worker, tenants, dataset_id: str) -> tuple[Any, dict[str, str]]:
    """Labeling's worker consumes ingestion's `dataset.changed` (before any feedback is queued: a worker running two
    threads could take the feedback first and dead-letter it for an unknown dataset); labeling's API and the token of
    an annotator of the dataset."""
    labeling = platform("labeling")
    with worker("labeling", ingestion_url=tenants.ingestion_url):

        def annotator_token():
            created = labeling.client.post(
                "/v1/annotators",
                json={"tenant": tenants.alice.tenant, "name": "ann", "datasets": [dataset_id]},
                headers=INTERNAL,
            )
            return bearer(created.get_json()["token"]) if created.status_code == 201 else None

        annotator = eventually(annotator_token, timeout=60, what="labeling knows the dataset")
    return labeling, annotator


def labeling_tasks(worker, tenants, known: tuple[Any, dict[str, str]], dataset_id: str, count: int):
    """Labeling's worker consumes the feedback on its queue: the dataset's tasks as its owner lists them, and the
    next one the annotator is handed."""
    labeling, annotator = known
    with worker("labeling", ingestion_url=tenants.ingestion_url):

        def listed():
            got = labeling.client.get(f"/v1/datasets/{dataset_id}/tasks", headers=tenants.alice.headers)
            tasks = got.get_json()["tasks"] if got.status_code == 200 else []
            return tasks if len(tasks) >= count else None

        tasks = eventually(listed, timeout=90, what=f"{count} feedback tasks")
        handed = labeling.client.get(f"/v1/datasets/{dataset_id}/tasks/next", headers=annotator)
        assert handed.status_code == 200, handed.get_json()
    return tasks, handed.get_json()


def entity_texts(text: str, spans: list[dict[str, Any]]) -> list[str]:
    return [text[span["start"] : span["end"]] for span in spans]


def test_span_feedback_on_a_logged_token_prediction_becomes_a_span_task(
    inference, store, registry, tenants, tagger_folder, platform, worker, settings
) -> None:
    dataset_id = token_dataset(tenants)
    known = labeling_knows(platform, worker, tenants, dataset_id)
    name = serve(store, registry, tenants, tagger_folder, dataset_id)
    replica = inference()
    headers = tenants.alice.headers
    first, second = predict(replica, headers, name, [TEXT, "plain words"])
    assert first["prediction_id"].startswith("prd_") and second["prediction_id"].startswith("prd_")
    assert first["prediction_id"] != second["prediction_id"]
    assert [e["text"] for e in first["entities"]] == WORDS

    # The log keeps the text and the entities; a token row has no class label and its least sure entity's score.
    replica.server.prediction_log.flush()
    logged = replica.client.get(f"/v1/predictions/{first['prediction_id']}", headers=headers).get_json()
    assert stored_input(store, logged["input"]).decode() == TEXT
    assert logged["predicted_label"] is None and logged["feedback_spans"] is None
    assert logged["confidence"] == pytest.approx(min(e["score"] for e in first["entities"]))
    assert logged["entities"] == [{k: e[k] for k in ("start", "end", "label", "score")} for e in first["entities"]]
    # Monitoring's figures are per class: the token rows are listed but counted in none of them.
    report = replica.client.get(f"/v1/monitoring/models/{name}", headers=headers)
    assert report.status_code == 200, report.get_json()
    counted = [
        version["predictions"] for window in report.get_json()["windows"] for version in window["versions"].values()
    ]
    assert counted and sum(counted) == 0

    corrected = [PARIS, ACME, ZOE_RUIZ]  # any order; answered and sent in text order
    given = feedback(replica, headers, {"prediction_id": first["prediction_id"], "spans": corrected})
    assert given.status_code == 200, given.get_json()
    result = given.get_json()
    assert result["correct_spans"] == [ZOE_RUIZ, ACME, PARIS] and result["correct_label"] is None
    assert entity_texts(TEXT, result["predicted_spans"]) == WORDS and result["predicted_label"] is None
    none = feedback(replica, headers, {"prediction_id": second["prediction_id"], "spans": []})
    assert none.status_code == 200 and none.get_json()["correct_spans"] == []

    events = eventually(lambda: feedback_events(settings) if len(feedback_events(settings)) == 2 else None)
    event = next(e for e in events if e["payload"]["prediction_id"] == first["prediction_id"])
    assert event["event_id"] == result["event_id"]
    payload = event["payload"]
    assert payload["correct_spans"] == [ZOE_RUIZ, ACME, PARIS] and payload["correct_label"] is None
    assert entity_texts(TEXT, payload["predicted_spans"]) == WORDS and payload["predicted_label"] is None
    assert stored_input(store, payload["input"]).decode() == TEXT and payload["dataset_id"] == dataset_id

    # Given once: the same spans again answer without a new event; other spans are a conflict.
    again = feedback(replica, headers, {"prediction_id": first["prediction_id"], "spans": [ZOE_RUIZ, ACME, PARIS]})
    assert again.status_code == 200 and again.get_json()["event_id"] is None
    other = feedback(replica, headers, {"prediction_id": first["prediction_id"], "spans": [ACME]})
    assert other.status_code == 409, other.get_json()
    assert other.get_json()["error"]["details"] == {"feedback_spans": [ZOE_RUIZ, ACME, PARIS]}
    assert len(feedback_events(settings)) == 2

    tasks, handed = labeling_tasks(worker, tenants, known, dataset_id, 2)
    by_prediction = {task["feedback"]["prediction_id"]: task for task in tasks}
    task = by_prediction[first["prediction_id"]]
    assert task["source"] == "feedback" and task["kind"] == "text" and task["priority"] >= 100
    assert task["prelabel_spans"] == [ZOE_RUIZ, ACME, PARIS] and task["prelabel"] is None
    assert task["feedback"]["correct_spans"] == [ZOE_RUIZ, ACME, PARIS]
    assert by_prediction[second["prediction_id"]]["prelabel_spans"] == []
    assert handed["task_type"] == "token_classification" and handed["source"] == "feedback"
    expected = {TEXT: [ZOE_RUIZ, ACME, PARIS], "plain words": []}
    assert handed["prelabel_spans"] == expected[handed["text"]]


def test_feedback_that_does_not_fit_the_prediction_answers_422_or_404(
    inference, store, registry, tenants, tagger_folder, model_folders
) -> None:
    name = serve(store, registry, tenants, tagger_folder, token_dataset(tenants))
    text_folder = model_folders["text"]
    registry.serve(
        serving_document(
            tenants.alice.tenant, text_folder, {4: upload_version(store, tenants.alice.tenant, text_folder, 4)}, 4
        )
    )
    replica = inference(feedback_lookup_wait_s=0.3)
    headers = tenants.alice.headers
    (token,) = predict(replica, headers, name, [TEXT])
    (review,) = predict(replica, headers, "reviews", ["a wonderful film"])
    token_id = token["prediction_id"]

    def refused(body: dict[str, Any], status: int = 422, as_headers=headers) -> dict[str, Any]:
        response = feedback(replica, as_headers, body)
        assert response.status_code == status, (body, response.get_json())
        return response.get_json()["error"]

    label_on_token = refused({"prediction_id": token_id, "label": "PER"})
    assert (
        "send the correct entity `spans`" in label_on_token["message"]
        and "label" in label_on_token["details"]["fields"]
    )
    spans_on_class = refused({"prediction_id": review["prediction_id"], "spans": [ZOE_RUIZ]})
    assert list(spans_on_class["details"]["fields"]) == ["spans"]
    both = refused({"prediction_id": token_id, "label": "PER", "spans": []})
    assert "exactly one of `label`" in json.dumps(both["details"])
    assert refused({"prediction_id": token_id})["details"]["fields"]
    beyond = refused({"prediction_id": token_id, "spans": [ZOE_RUIZ, {"start": 24, "end": 40, "label": "LOC"}]})
    assert list(beyond["details"]["fields"]["spans"]) == ["1"]
    assert "past the end of the text (29 code points)" in beyond["details"]["fields"]["spans"]["1"]["end"][0]
    unknown = refused({"prediction_id": token_id, "spans": [{"start": 0, "end": 3, "label": "DATE"}]})
    assert "not one of the model's entity labels" in unknown["details"]["fields"]["spans"]["0"]["label"][0]
    overlapping = refused({"prediction_id": token_id, "spans": [ZOE_RUIZ, {"start": 4, "end": 15, "label": "ORG"}]})
    assert "overlaps span 0" in overlapping["details"]["fields"]["spans"]["1"]["start"][0]
    assert refused({"prediction_id": "prd_nothing", "spans": []}, 404)
    assert refused({"prediction_id": token_id, "spans": []}, 404, tenants.bob.headers)
    # Nothing refused was recorded: the prediction still takes its feedback.
    accepted = feedback(replica, headers, {"prediction_id": token_id, "spans": [ACME]})
    assert accepted.status_code == 200 and accepted.get_json()["correct_spans"] == [ACME]


def test_a_redacted_log_keeps_entities_and_spans_on_the_right_characters(
    inference, store, registry, tenants, tagger_folder, platform, worker, settings
) -> None:
    dataset_id = token_dataset(tenants, pii_policy="redact")
    known = labeling_knows(platform, worker, tenants, dataset_id)
    name = serve(store, registry, tenants, tagger_folder, dataset_id)
    replica = inference()
    headers = tenants.alice.headers
    (answer,) = predict(replica, headers, name, [PII_TEXT])
    assert "jane" in [e["text"] for e in answer["entities"]]  # the model answered on the text as sent
    replica.server.prediction_log.flush()
    logged = replica.client.get(f"/v1/predictions/{answer['prediction_id']}", headers=headers).get_json()
    stored = stored_input(store, logged["input"]).decode()
    assert stored == PII_REDACTED
    # The entities moved onto the redacted text; those inside the e-mail address went with it.
    assert entity_texts(stored, logged["entities"]) == ["Zoë", "Ruiz", "wrote", "to", "from", "Paris"]
    assert logged["outputs"]["redacted"] == [[18, 38, 18, 25]]

    paris = {"start": PII_TEXT.index("Paris"), "end": PII_TEXT.index("Paris") + 5, "label": "LOC"}
    over_pii = feedback(
        replica,
        headers,
        {"prediction_id": answer["prediction_id"], "spans": [{"start": 18, "end": 22, "label": "PER"}]},
    )
    assert over_pii.status_code == 422, over_pii.get_json()
    assert "redacted" in over_pii.get_json()["error"]["details"]["fields"]["spans"]["0"]["start"][0]
    given = feedback(replica, headers, {"prediction_id": answer["prediction_id"], "spans": [ZOE_RUIZ, paris]})
    assert given.status_code == 200, given.get_json()
    assert given.get_json()["correct_spans"] == [ZOE_RUIZ, paris]  # offsets of the text sent, as given
    assert entity_texts(PII_TEXT, given.get_json()["predicted_spans"]) == [
        "Zoë",
        "Ruiz",
        "wrote",
        "to",
        "from",
        "Paris",
    ]
    (event,) = eventually(lambda: feedback_events(settings) or None, what="prediction.feedback")
    assert entity_texts(PII_REDACTED, event["payload"]["correct_spans"]) == ["Zoë Ruiz", "Paris"]

    _, handed = labeling_tasks(worker, tenants, known, dataset_id, 1)
    assert handed["text"] == PII_REDACTED
    assert entity_texts(handed["text"], handed["prelabel_spans"]) == ["Zoë Ruiz", "Paris"]


def test_labeling_moves_span_feedback_onto_the_text_it_redacts(
    inference, store, registry, tenants, tagger_folder, platform, worker, settings
) -> None:
    """Logged while the dataset's policy was off: labeling redacts the fed-back text itself and moves the spans."""
    dataset_id = token_dataset(tenants, pii_policy="off")
    known = labeling_knows(platform, worker, tenants, dataset_id)
    name = serve(store, registry, tenants, tagger_folder, dataset_id)
    replica = inference()
    headers = tenants.alice.headers
    (answer,) = predict(replica, headers, name, [PII_TEXT])
    replica.server.prediction_log.flush()
    turned_on = requests.patch(
        f"{tenants.ingestion_url}/v1/datasets/{dataset_id}", json={"pii_policy": "redact"}, headers=headers, timeout=10
    )
    assert turned_on.status_code == 200, turned_on.text
    paris = {"start": PII_TEXT.index("Paris"), "end": PII_TEXT.index("Paris") + 5, "label": "LOC"}
    jane = {"start": 18, "end": 22, "label": "PER"}  # inside the e-mail address: the logged text still has it
    given = feedback(replica, headers, {"prediction_id": answer["prediction_id"], "spans": [ZOE_RUIZ, jane, paris]})
    assert given.status_code == 200, given.get_json()
    (event,) = eventually(lambda: feedback_events(settings) or None, what="prediction.feedback")
    assert entity_texts(PII_TEXT, event["payload"]["correct_spans"]) == ["Zoë Ruiz", "jane", "Paris"]

    tasks, handed = labeling_tasks(worker, tenants, known, dataset_id, 1)
    assert handed["text"] == PII_REDACTED
    assert entity_texts(handed["text"], handed["prelabel_spans"]) == ["Zoë Ruiz", "Paris"]  # "jane" went with it
    assert tasks[0]["feedback"]["correct_spans"] == handed["prelabel_spans"]
