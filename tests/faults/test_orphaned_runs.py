"""A training worker SIGKILLed mid-run while another one lives: the live one takes the run over, nobody restarts
anything, and the run resumes from its last checkpoint and succeeds.

Two real `flywheel worker training` processes run against Redis with the deployed VISIBILITY_TIMEOUT (hours),
so the broker's redelivery of the dead worker's message is not what saves the run: the live worker's sweep
is, within about one lease (TRAINING_LEASE_SECONDS) and one sweep.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.training.config import TrainingConfig
from shared.artifacts import checkpoint_key
from shared.settings import Settings
from tests.helpers import INTERNAL, eventually, figures
from tests.training.support import all_runs, digits_run_body, published
from tests.training.workers import worker_environment, worker_process

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

WORKER_ENV = {"TRAINING_LEASE_SECONDS": "10"}
EPOCHS = 6
REQUEUE_SLACK_SECONDS = 3.0
"""Beyond a lease and a sweep, until the live worker has queued the run again: the sweep's own work."""
TAKEOVER_SECONDS = 90
"""From the requeue until the live worker holds the run: the task's trip through Redis, and on the worker's
first run the import of torch (over ten seconds on a loaded two-core machine)."""


def log_lines(path: Path, event: str) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if f'"{event}"' in line]


def test_a_run_whose_worker_is_sigkilled_completes_on_the_live_worker(platform, settings, tmp_path) -> None:
    api = platform("training")
    store = api.runtime.storage
    config = TrainingConfig.of(Settings.from_env(worker_environment(settings, **WORKER_ENV)))
    paths = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]

    with worker_process(settings, paths[0], **WORKER_ENV) as a, worker_process(settings, paths[1], **WORKER_ENV) as b:
        for path in paths:
            eventually(lambda path=path: log_lines(path, "run_sweeper_started"), timeout=90, what=f"{path.name} ready")
        body = digits_run_body(
            store,
            digits=(0, 1, 2),
            count=60,
            hyperparameters={"epochs": EPOCHS, "batch_size": 8, "early_stopping_patience": 0},
        )
        run_id = api.client.post("/v1/runs", json=body, headers=INTERNAL).get_json()["id"]
        running = eventually(
            lambda: next((r for r in all_runs(api.runtime) if r.epoch >= 1 and r.lease_owner), None),
            timeout=150,
            interval=0.05,
            what="a finished epoch",
        )
        holder = int(running.lease_owner.split(":")[1])
        victim, survivor = (a, b) if a.pid == holder else (b, a)
        assert victim.pid == holder, f"the run is held by {running.lease_owner}, neither worker"
        victim.send_signal(signal.SIGKILL)
        victim.wait()  # reaped, as by any supervisor
        killed_at = datetime.now(UTC)
        killed = all_runs(api.runtime)[0]
        assert killed.status == "running", "the run must still be unfinished when its worker dies"
        assert store.exists("checkpoints", checkpoint_key("acme", run_id))
        epochs_at_kill = killed.epoch

        taken = eventually(
            lambda: next((r for r in all_runs(api.runtime) if r.attempts == 2 and r.lease_owner), None),
            timeout=config.lease_seconds + config.sweep_seconds + TAKEOVER_SECONDS,
            interval=0.1,
            what="the live worker to take the run over",
        )
        assert int(taken.lease_owner.split(":")[1]) == survivor.pid
        run = eventually(
            lambda: next((r for r in all_runs(api.runtime) if r.status in ("succeeded", "failed")), None),
            timeout=150,
            what="the resumed run to finish",
        )
        assert survivor.poll() is None, "the live worker kept running throughout"

    assert run.status == "succeeded", run.failure_reason
    assert run.attempts == 2
    assert 1 <= epochs_at_kill <= run.resumed_from_epoch < EPOCHS
    assert [epoch["epoch"] for epoch in run.history] == list(range(1, EPOCHS + 1))
    survivor_log = paths[0] if survivor is a else paths[1]
    [requeued] = [line for path in paths for line in log_lines(path, "run_requeued")]
    assert requeued["run_id"] == run_id and requeued["reason"] in ("worker_gone", "lease_expired")
    assert requeued in log_lines(survivor_log, "run_requeued")
    requeued_after = (datetime.fromisoformat(requeued["timestamp"]) - killed_at).total_seconds()
    print(f"requeued {requeued_after:.1f} s after the kill ({requeued['reason']}; lease {config.lease_seconds:g} s)")
    assert requeued_after <= config.lease_seconds + config.sweep_seconds + REQUEUE_SLACK_SECONDS
    [resumed] = log_lines(survivor_log, "run_resumed")
    assert resumed["from_epoch"] == run.resumed_from_epoch
    assert log_lines(survivor_log, "run_epoch_finished")[-1]["epoch"] == EPOCHS
    [completed] = published(api.runtime, "training.completed", run_id)
    assert completed["payload"]["run_id"] == run_id
    assert published(api.runtime, "training.failed") == []
    figures("training_worker_sigkill_live_peer", sent=1, accepted=1, lost=0, duplicated=0, errors=0)
