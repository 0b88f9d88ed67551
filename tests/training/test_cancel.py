"""Cancelling a running run stops it at its next step: no model, a `training.failed` that says why."""

from __future__ import annotations

import pytest

from shared.artifacts import checkpoint_key
from tests.helpers import INTERNAL, eventually
from tests.training.support import all_runs, digits_run_body, published, wait_for_run

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_cancelling_a_running_run_stops_it(platform, worker, logs) -> None:
    api = platform("training")
    body = digits_run_body(
        api.runtime.storage,
        digits=(0, 1),
        count=60,
        hyperparameters={"epochs": 200, "batch_size": 8, "early_stopping_patience": 0},
    )
    with worker("training") as training:
        run_id = api.client.post("/v1/runs", json=body, headers=INTERNAL).get_json()["id"]
        eventually(lambda: all_runs(training)[0].epoch >= 1, timeout=60, what="the first epoch")
        running = api.client.get(f"/v1/runs/{run_id}", headers=INTERNAL).get_json()
        assert running["status"] == "running" and running["progress"]["epochs"] == 200
        assert running["progress"]["eta_seconds"] > 0
        answer = api.client.post(f"/v1/runs/{run_id}/cancel", headers=INTERNAL)
        assert answer.status_code == 202 and answer.get_json()["status"] == "cancelling"
        run = wait_for_run(training, status="cancelled", timeout=30)
    assert run.epoch < 200
    assert run.failure_reason == "cancelled by an operator during training"
    [failed] = published(api.runtime, "training.failed", run_id)
    assert failed["payload"]["reason"] == run.failure_reason and failed["payload"]["outcome"] == "cancelled"
    assert published(api.runtime, "training.completed") == []
    assert not api.runtime.storage.exists("checkpoints", checkpoint_key("acme", run_id))
    assert logs.find(event="run_cancelled", run_id=run_id)
