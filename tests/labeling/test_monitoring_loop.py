"""Labeling's part in monitoring: production traffic sampled for labeling becomes tasks tagged with the version
that answered; a settled item that came from a prediction sends its ground truth back (`prediction.labeled`);
a monitoring alert (`model.degraded`) freezes a snapshot and requests a retrain that records the alert's reason."""

from __future__ import annotations

import pytest

from tests.helpers import eventually
from tests.inference.test_feedback import queued_events

pytestmark = pytest.mark.timeout(120)


def labeled_events(settings) -> list[dict]:
    return [e for e in queued_events(settings.redis_url, "inference") if e["type"] == "prediction.labeled"]


def stored_text(harness, name: str, text: bytes) -> dict:
    info = harness.ingestion.runtime.storage.put("raw", f"{harness.tenant}/predictions/{name}.bin", text)
    return {"bucket": "raw", "key": info.key, "sha256": info.sha256, "offset": 0, "length": len(text)}


def test_sampled_and_feedback_predictions_send_their_consensus_back(harness, settings) -> None:
    dataset = harness.dataset()
    harness.send(
        "prediction.sampled",
        {
            "model_name": "reviews",
            "dataset_id": dataset,
            "items": [
                {
                    "prediction_id": "prd_sampled1",
                    "model_version": 7,
                    "input": stored_text(harness, "s1", b"an ordinary film"),
                    "predicted_label": "neg",
                    "confidence": 0.51,
                }
            ],
        },
    )
    harness.send(
        "prediction.feedback",
        {
            "prediction_id": "prd_feedback1",
            "model_name": "reviews",
            "model_version": 7,
            "dataset_id": dataset,
            "input": stored_text(harness, "f1", b"a wonderful film"),
            "predicted_label": "neg",
            "correct_label": "pos",
            "confidence": 0.9,
        },
    )
    harness.wait_tasks(dataset, 2)
    annotator = harness.annotator("ann", dataset)
    first = harness.next(annotator, dataset)  # feedback first, then the sample
    assert first["source"] == "feedback"
    assert harness.label(annotator, first["id"], "pos").status_code == 201
    second = harness.next(annotator, dataset)
    assert second["source"] == "sample" and second["prelabel"] == "neg" and second["prelabel_version"] == 7
    assert harness.label(annotator, second["id"], "pos").status_code == 201

    events = eventually(lambda: labeled_events(settings) if len(labeled_events(settings)) == 2 else None)
    by_id = {event["payload"]["prediction_id"]: event for event in events}
    assert by_id["prd_feedback1"]["payload"] == {
        "prediction_id": "prd_feedback1",
        "model_name": "reviews",
        "model_version": 7,
        "dataset_id": dataset,
        "label": "pos",
        "source": "feedback",
    }
    assert by_id["prd_sampled1"]["payload"]["source"] == "sample"
    assert by_id["prd_sampled1"]["payload"]["label"] == "pos"
    assert all(event["tenant"] == harness.tenant for event in events)

    harness.push(dataset, ["a pushed item"])
    harness.wait_tasks(dataset, 3)
    task = harness.next(annotator, dataset)
    assert task["source"] == "ingestion"
    assert harness.label(annotator, task["id"], "neg").status_code == 201
    assert len(labeled_events(settings)) == 2  # an item that came from no prediction sends nothing back


def test_a_monitoring_alert_requests_a_retrain_with_its_reason(harness, settings) -> None:
    dataset = harness.dataset()
    harness.push(dataset, [f"review {i}" for i in range(6)], ["pos", "neg"] * 3)
    harness.wait_tasks(dataset, 6)
    harness.send(
        "model.degraded",
        {
            "model_name": "reviews",
            "model_version": 4,
            "dataset_id": dataset,
            "alert_id": "alr_test1",
            "kind": "prediction_drift",
            "reason": "predicted classes drifted (Jensen-Shannon 0.558 > 0.2 over 100 predictions)",
            "value": 0.558,
            "threshold": 0.2,
            "samples": 100,
        },
        trace_id="trace-drift-1",
    )
    requested = eventually(
        lambda: [e for e in queued_events(settings.redis_url, "training") if e["type"] == "training.requested"],
        timeout=30,
        what="training.requested on training's queue",
    )
    (event,) = requested
    reason = event["payload"]["reason"]
    assert reason.startswith("monitoring: predicted classes drifted (Jensen-Shannon 0.558")
    assert "alr_test1" in reason and "reviews v4" in reason
    assert event["trace_id"] == "trace-drift-1" and event["payload"]["dataset_id"] == dataset
    snapshots = harness.labeling.client.get(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner).get_json()
    assert [s["reason"] for s in snapshots["snapshots"]] == ["monitoring"]
    assert snapshots["snapshots"][0]["item_count"] == 6
