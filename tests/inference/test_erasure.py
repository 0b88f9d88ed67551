"""A data subject's erasure reaches the prediction log: the subject's logged predictions (and their feedback) are
deleted and their inputs zeroed in the log's packed objects, the labeling task made from the feedback is
withdrawn, and the erasure's report lists ingestion's, labeling's and inference's counts; all real services."""

from __future__ import annotations

import pytest
import requests
from sqlalchemy import select

from services.labeling.models import Task
from tests.helpers import eventually
from tests.inference.test_feedback import stored_input
from tests.inference.test_pii_redaction import serve_reviews

pytestmark = pytest.mark.timeout(240)


def predict(replica, headers, texts: list[str], subject_id: str | None) -> list[str]:
    body = {"texts": texts, **({"subject_id": subject_id} if subject_id else {})}
    response = replica.client.post("/v1/models/reviews:predict", json=body, headers=headers)
    assert response.status_code == 200, response.get_json()
    return [p["prediction_id"] for p in response.get_json()["predictions"]]


def test_erasing_a_subject_deletes_its_logged_predictions_feedback_and_their_tasks(
    inference, store, registry, tenants, model_folders, worker
) -> None:
    dataset_id = serve_reviews(store, registry, tenants, model_folders, "off")
    headers = tenants.alice.headers
    ingestion = tenants.ingestion_url
    replica = inference(log_flush_interval_s=60.0)  # flushed by the test: every prediction in one packed object
    # Celery runs one app's workers per process: labeling's worker does its part, then ingestion's takes the reports.
    with worker("labeling", ingestion_url=ingestion) as labeling:
        pushed = requests.post(
            f"{ingestion}/v1/datasets/{dataset_id}/items",
            json={"items": [{"text": "a review by the subject", "subject_id": "cust-1"}]},
            headers=headers,
            timeout=10,
        )
        assert pushed.status_code == 200, pushed.text
        mine = predict(replica, headers, ["a wonderful film", "a terrible film"], "cust-1")
        [theirs] = predict(replica, headers, ["a wonderful day"], "cust-2")
        [anonymous] = predict(replica, headers, ["a terrible day"], None)
        replica.server.prediction_log.flush()
        logged = replica.client.get(f"/v1/predictions/{mine[0]}", headers=headers).get_json()
        assert logged["subject_id"] == "cust-1"
        feedback = replica.client.post("/v1/feedback", json={"prediction_id": mine[1], "label": "pos"}, headers=headers)
        assert feedback.status_code == 200, feedback.get_json()

        def task_of(prediction_id: str) -> Task | None:
            with labeling.db.session() as session:
                return session.scalar(select(Task).where(Task.prediction_id == prediction_id))

        eventually(lambda: task_of(mine[1]), timeout=60, what="the feedback task")

        response = requests.delete(f"{ingestion}/v1/subjects/cust-1", headers=headers, timeout=10)
        assert response.status_code == 202, response.text
        erasure_id = response.json()["id"]
        eventually(lambda: task_of(mine[1]).status == "withdrawn", timeout=60, what="the feedback task withdrawn")

    def completed() -> dict | None:
        got = requests.get(f"{ingestion}/v1/erasures/{erasure_id}", headers=headers, timeout=10).json()
        return got if got["status"] == "completed" else None

    with worker("ingestion"):
        report = eventually(completed, timeout=60, what="every service's part of the erasure")
    services = report["services"]
    assert services["ingestion"]["counts"]["items"] == 1
    assert services["inference"]["counts"] == {
        "predictions_deleted": 2,
        "feedback_records": 1,
        "ground_truth_records": 0,
        "shadow_answers": 0,
        "input_bytes": len("a wonderful film") + len("a terrible film"),
        "input_objects": 1,
    }
    assert services["labeling"]["steps"] == 2, "the item's deletion and the erased predictions"
    assert services["labeling"]["counts"]["tasks_withdrawn"] == 2, "the item's task and the feedback task"

    for gone in mine:
        assert replica.client.get(f"/v1/predictions/{gone}", headers=headers).status_code == 404
    kept = replica.client.get(f"/v1/predictions/{theirs}", headers=headers).get_json()
    assert kept["subject_id"] == "cust-2" and stored_input(store, kept["input"]) == b"a wonderful day"
    bucket, key = logged["input"]["bucket"], logged["input"]["key"]
    assert key == kept["input"]["key"], "one pack holds the subject's inputs and the others'"
    pack = store.get_bytes(bucket, key, verify=False)
    assert b"wonderful film" not in pack and b"terrible film" not in pack, "the subject's inputs are zeroed"
    start, length = logged["input"]["offset"], logged["input"]["length"]
    assert pack[start : start + length] == bytes(length)
    assert replica.client.get(f"/v1/predictions/{anonymous}", headers=headers).status_code == 200
    assert (
        requests.get(f"{ingestion}/v1/erasures/{erasure_id}", headers=tenants.bob.headers, timeout=10).status_code
        == 404
    )
