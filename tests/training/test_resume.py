"""A worker SIGKILLed mid-run: the run is redelivered, resumes from its last checkpoint, and yields one result.

The worker runs as a real `flywheel worker training` process (solo pool, prefetch 1) against Redis with a
5 s visibility timeout, exactly as deployed; the test kills it with SIGKILL after a checkpoint was written.
"""

from __future__ import annotations

import base64
import json
import signal

import pytest
import redis

from shared.artifacts import checkpoint_key
from tests.helpers import INTERNAL, eventually, figures
from tests.training.support import all_runs, digits_run_body, published
from tests.training.workers import worker_process

pytestmark = [pytest.mark.timeout(200), pytest.mark.slow]


def registry_event_ids(redis_url: str) -> list[str]:
    """event_ids of the training.completed messages waiting for the registry in Redis."""
    ids = []
    for raw in redis.Redis.from_url(redis_url).lrange("registry", 0, -1):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.append(args[0]["event_id"])
    return ids


@pytest.mark.faults
def test_a_killed_worker_resumes_from_its_last_checkpoint(platform, settings, tmp_path) -> None:
    api = platform("training")
    store = api.runtime.storage
    body = digits_run_body(
        store,
        digits=(0, 1, 2),
        count=60,
        hyperparameters={"epochs": 6, "batch_size": 8, "early_stopping_patience": 0},
    )
    run_id = api.client.post("/v1/runs", json=body, headers=INTERNAL).get_json()["id"]
    first_log, second_log = tmp_path / "worker-1.log", tmp_path / "worker-2.log"

    with worker_process(settings, first_log, VISIBILITY_TIMEOUT="5") as first:
        eventually(lambda: all_runs(api.runtime)[0].epoch >= 1, timeout=120, interval=0.05, what="a finished epoch")
        first.send_signal(signal.SIGKILL)
        first.wait()  # reaped: its pid is gone, as after a crash
    killed = all_runs(api.runtime)[0]
    assert killed.status == "running", "the run must still be unfinished when its worker dies"
    assert store.exists("checkpoints", checkpoint_key("acme", run_id))
    epochs_at_kill = killed.epoch
    assert [epoch["epoch"] for epoch in killed.history] == list(range(1, epochs_at_kill + 1))

    with worker_process(settings, second_log, VISIBILITY_TIMEOUT="5"):
        run = eventually(
            lambda: next((r for r in all_runs(api.runtime) if r.status in ("succeeded", "failed")), None),
            timeout=150,
            what="the resumed run to finish",
        )
        assert run.status == "succeeded", run.failure_reason
        eventually(lambda: registry_event_ids(settings.redis_url), timeout=10, what="the event on the bus")

    assert run.attempts == 2
    assert epochs_at_kill <= run.resumed_from_epoch < 6
    assert [epoch["epoch"] for epoch in run.history] == [1, 2, 3, 4, 5, 6]
    resumed = [json.loads(line) for line in second_log.read_text().splitlines() if '"run_resumed"' in line]
    assert resumed and resumed[0]["from_epoch"] == run.resumed_from_epoch
    second_epochs = second_log.read_text().count('"run_epoch_finished"')
    assert second_epochs == 6 - run.resumed_from_epoch, "the resumed worker must not train the saved epochs again"

    # Exactly one result: one training.completed in the outbox, one distinct event on the bus.
    [completed] = published(api.runtime, "training.completed", run_id)
    delivered = registry_event_ids(settings.redis_url)
    assert set(delivered) == {completed["event_id"]}
    figures("training_worker_sigkill", sent=1, accepted=1, lost=0, duplicated=len(delivered) - 1, errors=0)
    assert published(api.runtime, "training.failed") == []
    assert not store.exists("checkpoints", checkpoint_key("acme", run_id)), "checkpoints are removed after success"
