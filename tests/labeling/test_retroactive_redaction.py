"""A PII policy turned on after production traffic became tasks reaches those tasks: `dataset.changed` carries the
policy, and labeling's worker redacts the text of the dataset's sampled and fed-back tasks that have no consensus
yet (their spans moved onto the redacted text), once; the next snapshot holds the redacted text. Changes can reach
labeling out of order (a retry that lost a race, a second worker, a redelivery): each carries the dataset's revision
at ingestion, and labeling keeps the newest."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import select, text

from services.labeling.models import Annotation, LabelingDataset, Task
from tests.helpers import create_partner, eventually
from tests.labeling.conftest import Harness

pytestmark = pytest.mark.timeout(180)

TEXT = "a fine film, write to jane.doe@example.com about it"
REDACTED = "a fine film, write to [EMAIL] about it"
LATE = "dull, mail joe.bloggs@example.org for a refund"


@pytest.fixture
def harness(platform, worker):
    """Labeling's worker asks ingestion (served) for the policy, as it does in production."""
    ingestion = platform("ingestion")
    labeling = platform("labeling")
    with worker("labeling", ingestion_url=ingestion.url) as runtime:
        issued = create_partner(ingestion.client, "acme")
        yield Harness(ingestion, labeling, runtime, issued["api_key"], issued["partner"]["id"])


def logged(harness: Harness, name: str, texts: list[str]) -> list[dict[str, Any]]:
    """Texts packed into one object as the prediction log packs inputs: a byte range and a sha256 each."""
    data = [text.encode() for text in texts]
    info = harness.ingestion.runtime.storage.put("raw", f"{harness.tenant}/predictions/{name}.bin", b"".join(data))
    references, offset = [], 0
    for chunk in data:
        digest = hashlib.sha256(chunk).hexdigest()
        references.append({"bucket": "raw", "key": info.key, "sha256": digest, "offset": offset, "length": len(chunk)})
        offset += len(chunk)
    return references


def sample(harness: Harness, dataset: str, prediction_id: str, reference: dict[str, Any]) -> None:
    item = {"prediction_id": prediction_id, "model_version": 3, "input": reference, "predicted_label": "pos"}
    harness.send("prediction.sampled", {"model_name": "reviews", "dataset_id": dataset, "items": [item]})


def set_policy(harness: Harness, dataset: str, policy: str) -> None:
    response = harness.ingestion.client.patch(
        f"/v1/datasets/{dataset}", json={"pii_policy": policy}, headers=harness.partner
    )
    assert response.status_code == 200, response.get_json()


def content(harness: Harness, annotator: dict[str, str], task_id: int) -> str:
    response = harness.labeling.client.get(f"/v1/tasks/{task_id}/content", headers=annotator)
    assert response.status_code == 200, response.get_json()
    return response.data.decode()


def task_row(harness: Harness, item_id: str) -> Task:
    with harness.worker.db.read_session() as session:
        return session.scalar(select(Task).where(Task.item_id == item_id))


def test_a_policy_turned_on_redacts_sampled_tasks_and_the_next_snapshot(harness, logs) -> None:
    dataset = harness.dataset(overlap=1)
    clean, raw = logged(harness, "log1", ["a plain film", TEXT])
    sample(harness, dataset, "prd_clean", clean)
    sample(harness, dataset, "prd_raw", raw)
    harness.wait_tasks(dataset, 2)
    alice = harness.annotator("alice", dataset)
    raw_task = task_row(harness, "sp_prd_raw")
    assert content(harness, alice, raw_task.id) == TEXT, "logged while the policy was off"

    set_policy(harness, dataset, "redact")
    eventually(lambda: content(harness, alice, raw_task.id) == REDACTED, what="the sampled task's text redacted")
    redacted = task_row(harness, "sp_prd_raw")
    assert (redacted.bucket, redacted.offset) == ("raw", None)
    assert redacted.object_key.startswith(f"{harness.tenant}/feedback/sp_prd_raw.")
    assert task_row(harness, "sp_prd_clean").object_key == clean["key"], "a text without PII keeps its reference"
    (applied,) = logs.find(event="queue_pii_policy_applied", dataset_id=dataset)
    assert (applied["tasks_scanned"], applied["tasks_redacted"]) == (2, 1)

    # A redelivered change (or one of another setting) does not scan the queue again.
    set_policy(harness, dataset, "redact")
    # Traffic sampled while the policy was off, arriving after labeling applied it, is redacted as it is queued.
    (late,) = logged(harness, "log2", [LATE])
    sample(harness, dataset, "prd_late", late)
    harness.wait_tasks(dataset, 3)
    late_task = eventually(lambda: task_row(harness, "sp_prd_late"), what="the late sampled task")
    assert content(harness, alice, late_task.id) == "dull, mail [EMAIL] for a refund"
    eventually(lambda: len(logs.find(event="dataset_configured", dataset_id=dataset)) == 3, what="the second change")
    assert len(logs.find(event="queue_pii_policy_applied", dataset_id=dataset)) == 1
    assert task_row(harness, "sp_prd_raw").object_key == redacted.object_key

    while (task := harness.next(alice, dataset)) is not None:  # each annotated, and at overlap 1 settled
        if task["item_id"] != "sp_prd_clean":
            assert task["text"] in (REDACTED, "dull, mail [EMAIL] for a refund")
        answered = harness.label(alice, task["id"], "neg")
        assert answered.status_code in (200, 201), answered.get_json()
    snapshot = harness.labeling.client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner)
    assert snapshot.status_code == 201, snapshot.get_json()
    exported = harness.labeling.client.get(
        f"/v1/snapshots/{snapshot.get_json()['id']}/export?format=jsonl", headers=harness.partner
    )
    assert exported.status_code == 200
    rows = {row["item_id"]: row for row in map(json.loads, exported.data.decode().splitlines())}
    assert rows["sp_prd_raw"]["text"] == REDACTED
    assert rows["sp_prd_late"]["text"] == "dull, mail [EMAIL] for a refund"
    assert b"jane.doe" not in exported.data and b"joe.bloggs" not in exported.data


def test_a_policy_turned_on_moves_a_span_tasks_entities_onto_the_redacted_text(harness) -> None:
    dataset = harness.dataset(name="news", task_type="token_classification", labels=["PER", "ORG", "LOC"])
    text = "Zoe wrote to zoe@example.com from Paris"
    zoe, paris = {"start": 0, "end": 3, "label": "PER"}, {"start": 34, "end": 39, "label": "LOC"}
    over_email = {"start": 13, "end": 28, "label": "ORG"}
    (reference,) = logged(harness, "news1", [text])
    harness.send(
        "prediction.feedback",
        {
            "prediction_id": "prd_news1",
            "model_name": "news",
            "model_version": 2,
            "dataset_id": dataset,
            "input": reference,
            "predicted_label": None,
            "correct_label": None,
            "predicted_spans": [zoe, over_email],
            "correct_spans": [zoe, paris],
        },
    )
    harness.wait_tasks(dataset, 1)
    task = task_row(harness, "fb_prd_news1")
    with harness.worker.db.session() as session:  # an annotator's answer given on the raw text, before consensus
        session.add(Annotation(task_id=task.id, annotator_id="ann_1", source="human", spans=[zoe, over_email, paris]))

    set_policy(harness, dataset, "redact")
    redacted = eventually(
        lambda: (row := task_row(harness, "fb_prd_news1")).offset is None and row, what="the span task redacted"
    )
    new_text = "Zoe wrote to [EMAIL] from Paris"
    assert harness.worker.storage.get_bytes("raw", redacted.object_key).decode() == new_text
    moved_paris = {"start": new_text.index("Paris"), "end": new_text.index("Paris") + 5, "label": "LOC"}
    assert redacted.feedback["correct_spans"] == [zoe, moved_paris]
    assert redacted.feedback["predicted_spans"] == [zoe], "an entity over the e-mail is dropped"
    assert redacted.prelabel_spans == [zoe, moved_paris]
    with harness.worker.db.read_session() as session:
        (annotation,) = session.scalars(select(Annotation).where(Annotation.task_id == task.id))
    assert annotation.spans == [zoe, moved_paris]


def ingestion_dataset(harness, dataset_id: str) -> dict:
    response = harness.ingestion.client.get(f"/v1/datasets/{dataset_id}", headers=harness.partner)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def labeling_row(harness, dataset_id: str) -> LabelingDataset:
    with harness.worker.db.read_session() as session:
        return session.scalar(select(LabelingDataset).where(LabelingDataset.id == dataset_id))


@pytest.fixture
def pg_harness(postgres_database, harness_factory) -> Harness:
    """The same harness on PostgreSQL, where the consumers lock the dataset's row (SQLite has one writer anyway)."""
    return harness_factory(database_url=postgres_database())


def test_an_older_change_handled_after_a_newer_one_changes_nothing(pg_harness, logs) -> None:
    harness = pg_harness
    dataset = harness.dataset(overlap=1)
    created = ingestion_dataset(harness, dataset)
    assert (created["revision"], created["pii_policy"], created["labels"]) == (1, "off", ["neg", "pos"])

    change = {"pii_policy": "redact", "labels": ["neg", "pos", "meh"]}
    changed = harness.ingestion.client.patch(f"/v1/datasets/{dataset}", json=change, headers=harness.partner)
    assert changed.status_code == 200, changed.get_json()
    assert changed.get_json()["revision"] == 2
    eventually(lambda: labeling_row(harness, dataset).config_revision == 2, what="labeling to take revision 2")

    # The creation's event again, handled after the change: what a retry that lost its race delivers.
    stale = {
        "dataset_id": dataset,
        "name": created["name"],
        "task_type": created["task_type"],
        "labels": created["labels"],
        "overlap": created["overlap"],
        "retrain_threshold": created["retrain_threshold"],
        "pii_policy": "off",
        "pii_entities": None,
        "revision": 1,
    }
    harness.send("dataset.changed", {"dataset": stale})
    eventually(
        lambda: len(logs.find(event="dataset_configured", dataset_id=dataset, revision=1)) == 2,
        what="labeling to handle revision 1 again",
    )
    row = labeling_row(harness, dataset)
    assert (row.config_revision, row.pii_policy, row.labels) == (2, "redact", ["neg", "pos", "meh"])
    assert row.pii_redacted_with == {"entities": None}

    # Feedback on a prediction logged while the policy was off, with the label only revision 2 has.
    (reference,) = logged(harness, "fb1", [TEXT])
    harness.send(
        "prediction.feedback",
        {
            "prediction_id": "prd_fb1",
            "model_name": "reviews",
            "model_version": 3,
            "dataset_id": dataset,
            "input": reference,
            "predicted_label": "pos",
            "correct_label": "meh",
        },
    )
    task = eventually(lambda: task_row(harness, "fb_prd_fb1"), what="the feedback task")
    alice = harness.annotator("alice", dataset)
    assert content(harness, alice, task.id) == REDACTED
    assert task.feedback["correct_label"] == "meh"

    # A change made after it still applies: revisions only ever move forward.
    off = harness.ingestion.client.patch(f"/v1/datasets/{dataset}", json={"pii_policy": "off"}, headers=harness.partner)
    assert off.status_code == 200 and off.get_json()["revision"] == 3
    eventually(lambda: labeling_row(harness, dataset).pii_policy == "off", what="labeling to take revision 3")
    assert labeling_row(harness, dataset).pii_redacted_with is None


def test_a_push_is_handled_while_a_consumer_holds_the_dataset_for_its_policy(pg_harness) -> None:
    """The feedback and sampled consumers hold a shared lock on the dataset's row while they apply its PII policy;
    a push that changes none of the dataset's settings needs no lock of its own, so its tasks are made meanwhile."""
    harness = pg_harness
    dataset = harness.dataset(overlap=1)
    with harness.worker.db.engine.connect() as held:
        held.execute(text("SELECT id FROM datasets WHERE id = :id FOR SHARE"), {"id": dataset})
        harness.push(dataset, ["a film made while the row was held"])
        harness.wait_tasks(dataset, 1)
        held.rollback()
