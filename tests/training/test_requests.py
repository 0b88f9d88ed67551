"""`training.requested` from the bus: recorded once, and every unusable request ends in `training.failed`
with a reason a person can act on."""

from __future__ import annotations

import pytest

from tests.helpers import eventually
from tests.training.support import (
    all_runs,
    digit_items,
    published,
    request_training,
    text_items,
    wait_for_run,
    write_snapshot,
)

pytestmark = pytest.mark.timeout(120)

TEXT = "text_classification"
IMAGE = "image_classification"
TEXT_LABELS = ["databases", "numerics", "web"]


def runs_of(runtime, snapshot_id: str):
    return [run for run in all_runs(runtime) if run.snapshot_id == snapshot_id]


def failure_reason(runtime, snapshot_id: str) -> str:
    [run] = eventually(
        lambda: [r for r in runs_of(runtime, snapshot_id) if r.status == "failed"],
        timeout=60,
        what=f"the run of {snapshot_id} to fail",
    )
    [event] = published(runtime, "training.failed", run.id)
    assert event["payload"]["reason"] == run.failure_reason
    assert event["payload"]["snapshot_id"] == snapshot_id and event["payload"]["outcome"] == "failed"
    return run.failure_reason


def test_unusable_requests_fail_with_a_reason(worker) -> None:
    with worker("training") as training:
        store = training.storage

        def send(snapshot, task_type=TEXT, labels=TEXT_LABELS, **options):
            request_training(
                training,
                tenant="acme",
                dataset_id="ds_docs",
                snapshot=snapshot,
                task_type=task_type,
                labels=labels,
                **options,
            )

        def snapshot(items, task_type=TEXT, labels=TEXT_LABELS):
            return write_snapshot(
                store, tenant="acme", dataset_id="ds_docs", task_type=task_type, labels=labels, items=items
            )

        missing = {
            "snapshot_id": "snap_gone",
            "manifest": {
                "bucket": "datasets",
                "key": "acme/ds_docs/snapshots/snap_gone/manifest.jsonl",
                "sha256": "0" * 64,
            },
        }
        send(missing)
        empty = snapshot([])
        send(empty)
        train_only = snapshot([item | {"split": "train"} for item in text_items(per_label=3)])
        send(train_only)
        tampered = snapshot(text_items(per_label=3))
        send({**tampered, "manifest": {**tampered["manifest"], "sha256": "f" * 64}})
        wrong_labels = snapshot(text_items(per_label=3))
        send(wrong_labels, labels=["databases", "web"])
        invalid = snapshot(text_items(per_label=3))
        send(invalid, hyperparameters={"epochs": 0, "image_size": 32})

        assert "does not exist" in failure_reason(training, "snap_gone")
        assert "snapshot" in failure_reason(training, "snap_gone")
        assert "is empty" in failure_reason(training, empty["snapshot_id"])
        assert "no items in its validation split" in failure_reason(training, train_only["snapshot_id"])
        assert "overwritten" in failure_reason(training, tampered["snapshot_id"])
        assert "not among the run's labels" in failure_reason(training, wrong_labels["snapshot_id"])
        reason = failure_reason(training, invalid["snapshot_id"])
        assert "invalid training request" in reason and "epochs" in reason and "image_size" in reason
        assert not published(training, "training.completed")


def test_a_request_is_trained_once_however_often_it_arrives(worker, logs) -> None:
    labels = ["0", "1"]
    options = {
        "task_type": IMAGE,
        "labels": labels,
        "base_model": "mobilenet_v3_small",
        "hyperparameters": {"epochs": 1, "image_size": 32, "batch_size": 16},
    }
    with worker("training") as training:
        snapshot = write_snapshot(
            training.storage,
            tenant="acme",
            dataset_id="ds_digits",
            task_type=IMAGE,
            labels=labels,
            items=digit_items(30, digits=(0, 1)),
        )
        message = request_training(training, tenant="acme", dataset_id="ds_digits", snapshot=snapshot, **options)
        training.bus.send(message, "training")  # the same event delivered twice
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=90)
        assert run.status == "succeeded", run.failure_reason
        # The same request again, as a new event: the snapshot was already trained with these settings.
        request_training(training, tenant="acme", dataset_id="ds_digits", snapshot=snapshot, **options)
        eventually(lambda: logs.find(event="training_request_duplicate"), what="the repeated request to be skipped")
        eventually(lambda: logs.find(event="event_duplicate_skipped"), what="the redelivered event to be skipped")
        assert [r.id for r in all_runs(training)] == [run.id]
        # Different hyper-parameters make a different request.
        request_training(
            training,
            tenant="acme",
            dataset_id="ds_digits",
            snapshot=snapshot,
            **{**options, "hyperparameters": {**options["hyperparameters"], "seed": 7}},
        )
        eventually(lambda: len(all_runs(training)) == 2, what="a second run")
        wait_for_run(training, status="succeeded", run_id=all_runs(training)[1].id, timeout=90)
    assert len(published(training, "training.completed")) == 2
