"""Model assistance, feedback, snapshots, exports and the retrain policy."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter

import pytest
from flask import Flask, jsonify, request
from sqlalchemy import select

from services.labeling.consensus import fleiss_kappa
from shared.events.tables import event_tables
from shared.storage import ObjectStore
from tests.conftest import INTERNAL_TOKEN, serve
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(120)

CONFIDENCE = {"great": 0.95, "fine": 0.55, "awful": 0.80, "meh": 0.51}


def fake_inference(store: ObjectStore) -> tuple[Flask, list[dict]]:
    """Speaks the inference service's predict API over a real socket (test_prelabels_by_reference runs the real one).
    Like inference, it reads the referenced items from object storage, the tenant's own only, and checks each
    sha256. Its 'model' reads the first word of each text and is more or less sure of it."""
    app = Flask("fake-inference")
    calls: list[dict] = []

    @app.post("/v1/models/<name>:predict")
    def predict(name: str):
        calls.append(
            {
                "name": name,
                "headers": dict(request.headers),
                "trace_id": request.headers.get("X-Request-ID"),
                "body": request.get_json(),
            }
        )
        tenant = request.headers.get("X-Flywheel-Tenant")
        if request.headers.get("Authorization") != f"Bearer {INTERNAL_TOKEN}" or not tenant:
            return jsonify(error={"code": "unauthorized"}), 401
        texts = []
        for reference in request.get_json()["references"]:
            if not reference["key"].startswith(f"{tenant}/"):
                return jsonify(error={"code": "not_found"}), 404
            data = store.get_range(reference["bucket"], reference["key"], reference["offset"] or 0, reference["length"])
            if hashlib.sha256(data).hexdigest() != reference["sha256"]:
                return jsonify(error={"code": "validation_failed"}), 422
            texts.append(data.decode())
        predictions = []
        for index, text in enumerate(texts):
            word = text.split()[0]
            confidence = CONFIDENCE.get(word, 0.6)
            label = "pos" if word in {"great", "fine"} else "neg"
            predictions.append(
                {
                    "prediction_id": f"p{index}",
                    "label": label,
                    "confidence": confidence,
                    "probabilities": {label: confidence},
                }
            )
        return jsonify(model_name=name, model_version=3, predictions=predictions)

    return app, calls


def test_prelabels_order_the_queue_by_uncertainty_and_auto_accept_is_recorded(harness_factory, store) -> None:
    app, calls = fake_inference(store)
    url, stop = serve(app)
    try:
        harness = harness_factory(inference_url=url)
        dataset = harness.dataset()
        harness.push(dataset, ["great film", "fine film", "awful film", "meh film"])
        harness.wait_tasks(dataset, 4)
        harness.promote(dataset)

        def prelabeled():
            tasks = harness.labeling.client.get(f"/v1/datasets/{dataset}/tasks", headers=harness.partner).get_json()
            return tasks["tasks"] if all(t["prelabel"] for t in tasks["tasks"]) else None

        tasks = eventually(prelabeled, what="pre-labels on every task")
        assert calls and calls[0]["name"] == "reviews" and calls[0]["headers"]["X-Flywheel-Tenant"] == harness.tenant
        assert "texts" not in calls[0]["body"] and len(calls[0]["body"]["references"]) == 4, "references, not bytes"
        assert {t["prelabel_version"] for t in tasks} == {3}
        alice = harness.annotator("alice", dataset)
        order = []
        while (task := harness.next(alice, dataset)) is not None:
            order.append(task["text"])
            assert task["prelabel"] and task["prelabel_confidence"] == CONFIDENCE[task["text"].split()[0]]
            harness.label(alice, task["id"], task["prelabel"])
        assert order == ["meh film", "fine film", "awful film", "great film"], "least confident first"

        harness.labeling.client.patch(
            f"/v1/datasets/{dataset}/settings", json={"auto_accept_threshold": 0.9}, headers=harness.partner
        )
        harness.push(dataset, ["great movie", "meh movie"])
        eventually(lambda: harness.task_count(dataset, "done") == 5, what="the confident prediction auto-accepted")
        tasks = harness.labeling.client.get(f"/v1/datasets/{dataset}/tasks?status=done", headers=harness.partner)
        auto = [t for t in tasks.get_json()["tasks"] if t["consensus_source"] == "model_auto"]
        assert len(auto) == 1 and auto[0]["consensus_label"] == "pos" and auto[0]["agreement"] == 0.95
    finally:
        stop()


def test_prelabel_calls_carry_the_trace_id_of_what_caused_them(harness_factory, store) -> None:
    """A promotion's trace id, and a push's, reach inference as X-Request-ID, so its log lines carry them."""
    app, calls = fake_inference(store)
    url, stop = serve(app)
    try:
        harness = harness_factory(inference_url=url)
        dataset = harness.dataset()
        harness.push(dataset, ["great film"])
        harness.wait_tasks(dataset, 1)
        harness.promote(dataset, trace_id="trace-of-the-promotion")
        eventually(lambda: calls, what="the pre-label call of the promotion")
        assert calls[0]["trace_id"] == "trace-of-the-promotion"

        harness.push(dataset, ["awful film"], trace_id="trace-of-the-push")
        eventually(lambda: len(calls) == 2, what="the pre-label call of the push")
        assert calls[1]["trace_id"] == "trace-of-the-push"
        assert [r["sha256"] for r in calls[1]["body"]["references"]] == [hashlib.sha256(b"awful film").hexdigest()]
    finally:
        stop()


def test_inference_being_down_never_blocks_labeling(harness_factory) -> None:
    harness = harness_factory(inference_url="http://127.0.0.1:9")  # nothing listens there
    dataset = harness.dataset()
    harness.push(dataset, ["a film"])
    harness.wait_tasks(dataset, 1)
    harness.promote(dataset)
    eventually(
        lambda: (
            harness.labeling.client.get(f"/v1/datasets/{dataset}", headers=harness.partner).get_json()[
                "production_model"
            ]
            == "reviews"
        ),
        what="the promotion to be recorded",
    )
    alice = harness.annotator("alice", dataset)
    task = harness.next(alice, dataset)
    assert task["prelabel"] is None
    assert harness.label(alice, task["id"], "pos").status_code == 201


def test_feedback_creates_a_high_priority_prelabeled_task(harness) -> None:
    dataset = harness.dataset()
    harness.push(dataset, ["ordinary item"])
    harness.wait_tasks(dataset, 1)
    stored = harness.ingestion.runtime.storage.put("raw", f"{harness.tenant}/predictions/p1.txt", b"served text")
    feedback = {
        "prediction_id": "pred_1",
        "model_name": "reviews",
        "model_version": 2,
        "dataset_id": dataset,
        "input": {"bucket": "raw", "key": stored.key, "sha256": stored.sha256},
        "predicted_label": "pos",
        "correct_label": "neg",
        "confidence": 0.7,
    }
    harness.send("prediction.feedback", feedback)
    harness.send("prediction.feedback", feedback | {"correct_label": "maybe", "prediction_id": "pred_2"})
    harness.wait_tasks(dataset, 2)
    alice = harness.annotator("alice", dataset)
    task = harness.next(alice, dataset)
    assert task["source"] == "feedback" and task["priority"] > 0
    assert task["prelabel"] == "pos" and task["feedback"]["correct_label"] == "neg"
    content = harness.labeling.client.get(f"/v1/tasks/{task['id']}/content", headers=alice)
    assert content.data == b"served text"
    dead = eventually(
        lambda: harness.labeling.client.get(
            "/v1/admin/dead-letters", headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"}
        ).get_json()["dead_letters"]
    )
    assert "'maybe' is not in the dataset's label set" in dead[0]["error"] and dead[0]["attempts"] == 1


def test_snapshots_are_immutable_with_a_deterministic_split_and_export(harness) -> None:
    dataset = harness.dataset()
    texts = [f"review {i}" for i in range(40)]
    harness.push(dataset, texts[:30], ["pos" if i % 3 else "neg" for i in range(30)])
    harness.wait_tasks(dataset, 30)
    client = harness.labeling.client
    first = client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner)
    assert first.status_code == 201, first.get_json()
    first = first.get_json()
    assert first["item_count"] == 30 and sum(first["split_counts"].values()) == 30
    assert first["label_counts"] == {"pos": 20, "neg": 10}
    storage = harness.worker.storage
    manifest_v1 = storage.get_bytes("datasets", first["manifest_key"])
    assert hashlib.sha256(manifest_v1).hexdigest() == first["manifest_sha256"]

    harness.push(dataset, texts[30:], ["pos"] * 10)
    harness.wait_tasks(dataset, 40)
    second = client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner).get_json()
    assert second["item_count"] == 40 and second["manifest_key"] != first["manifest_key"]
    assert storage.get_bytes("datasets", first["manifest_key"]) == manifest_v1, "a snapshot never changes"
    lines_v1 = {json.loads(line)["item_id"]: json.loads(line) for line in manifest_v1.decode().splitlines()}
    manifest_v2 = storage.get_bytes("datasets", second["manifest_key"]).decode().splitlines()
    lines_v2 = {json.loads(line)["item_id"]: json.loads(line) for line in manifest_v2}
    assert all(lines_v2[item]["split"] == line["split"] for item, line in lines_v1.items()), "splits are stable"
    # Held out (validation and test together, buckets 0-19 of 100): a fifth, the share before the test split.
    assert 0 < second["split_counts"]["validation"] + second["split_counts"]["test"] < 40

    exported = client.get(f"/v1/snapshots/{first['id']}/export?format=jsonl", headers=harness.partner)
    rows = [json.loads(line) for line in exported.data.decode().splitlines()]
    assert len(rows) == 30 and {row["text"] for row in rows} == set(texts[:30])
    csv_rows = client.get(f"/v1/snapshots/{first['id']}/export?format=csv", headers=harness.partner).data.decode()
    assert csv_rows.splitlines()[0] == "item_id,split,label,sha256,text" and len(csv_rows.splitlines()) == 31
    empty = harness.dataset(name="empty")
    eventually(lambda: client.get(f"/v1/datasets/{empty}", headers=harness.partner).status_code == 200)
    refused = client.post(f"/v1/datasets/{empty}/snapshots", headers=harness.partner)
    assert refused.status_code == 422 and "no consensus labels" in refused.get_json()["error"]["message"]
    snapshot_list = client.get(f"/v1/datasets/{empty}/snapshots", headers=harness.partner).get_json()
    assert snapshot_list["snapshots"] == [], "a refused snapshot leaves no record"


def test_the_retrain_policy_fires_exactly_once_under_concurrent_annotations(harness_factory, postgres_database) -> None:
    harness = harness_factory(database_url=postgres_database())
    dataset = harness.dataset(overlap=1, retrain_threshold=6)
    harness.push(dataset, [f"item {i}" for i in range(9)])
    harness.wait_tasks(dataset, 9)
    people = [harness.annotator(f"a{i}", dataset) for i in range(6)]
    barrier = threading.Barrier(len(people))
    statuses: list[int | None] = []

    def work(headers):
        task = harness.next(headers, dataset)
        barrier.wait()
        statuses.append(None if task is None else harness.label(headers, task["id"], "pos").status_code)

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [201] * len(people), "each annotator got a task of its own and labeled it"
    outbox = event_tables(harness.worker.db.metadata).outbox

    def requested():
        with harness.worker.db.session() as session:
            rows = session.scalars(select(outbox.c.envelope).where(outbox.c.event_type == "training.requested")).all()
        return rows

    [event] = eventually(requested, timeout=60, what="one training.requested")
    assert event["payload"]["model_name"] == "reviews" and event["payload"]["task_type"] == "text_classification"
    assert event["payload"]["manifest"]["bucket"] == "datasets"
    snapshots = harness.labeling.client.get(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner).get_json()
    assert [s["reason"] for s in snapshots["snapshots"]] == ["retrain_policy"]
    assert snapshots["snapshots"][0]["item_count"] == 6
    state = harness.labeling.client.get(f"/v1/datasets/{dataset}", headers=harness.partner).get_json()
    assert state["labels_since_snapshot"] == 0
    # Three more labels are below the threshold: nothing more fires.
    extra = harness.annotator("late", dataset)
    for _ in range(3):
        task = harness.next(extra, dataset)
        harness.label(extra, task["id"], "neg")
    assert len(requested()) == 1


def test_fleiss_kappa_on_the_textbook_example() -> None:
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa = 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    items = [Counter({str(j): c for j, c in enumerate(row) if c}) for row in table]
    kappa, agreement, used = fleiss_kappa(items)
    assert round(kappa, 3) == 0.210 and round(agreement, 3) == 0.378 and used == 10
    assert fleiss_kappa([Counter({"a": 1})]) == (None, None, 0)
    perfect, _, _ = fleiss_kappa([Counter({"a": 3}), Counter({"b": 3})])
    assert perfect == 1.0
