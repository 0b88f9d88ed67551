"""How a run's task reaches the training worker when a dependency fails, with no worker restart.

- A run accepted while Redis is down starts once Redis answers again: its task waits in the outbox and the
  relay sends it within a few relay intervals; the worker that ran all along picks it up (the start-up sweep
  is not what saves it).
- An attempt that loses object storage gives the run back, and the task retries with backoff until the run
  trains: one run, two attempts, one model.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import RunningService
from tests.helpers import INTERNAL, eventually, figures
from tests.training.support import digits_run_body, published

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

OUTAGE_SECONDS = 5
SENT_WITHIN_SECONDS = 10
"""A few relay intervals (OUTBOX_RELAY_INTERVAL is 0.5 s in tests), reconnecting to the Redis that came back
included; a worker restart is never part of it."""


class RunApi:
    """The run API of one training service, as an operator uses it."""

    def __init__(self, service: RunningService) -> None:
        self.service = service

    def request_small_run(self) -> dict[str, Any]:
        body = digits_run_body(
            self.service.runtime.storage,
            digits=(0, 1),
            count=30,
            hyperparameters={"epochs": 1, "batch_size": 16},
        )
        answer = self.service.client.post("/v1/runs", json=body, headers=INTERNAL)
        assert answer.status_code == 202, answer.get_json()
        return answer.get_json()

    def run(self, run_id: str) -> dict[str, Any]:
        answer = self.service.client.get(f"/v1/runs/{run_id}", headers=INTERNAL)
        assert answer.status_code == 200, answer.get_json()
        return answer.get_json()

    def status(self, run_id: str) -> str:
        return self.run(run_id)["status"]

    def ended(self, run_id: str) -> str | None:
        now = self.status(run_id)
        return now if now in ("succeeded", "failed", "cancelled") else None


def test_a_run_accepted_while_redis_is_down_runs_when_redis_returns(platform, worker, proxy, redis_url) -> None:
    real = urlsplit(redis_url)
    broker = proxy(real.hostname, real.port)
    through_proxy = real._replace(netloc=broker.address).geturl()
    api = platform("training", redis_url=through_proxy)
    runs = RunApi(api)

    with worker("training", redis_url=through_proxy):
        broker.cut()
        run_id = runs.request_small_run()["id"]
        time.sleep(OUTAGE_SECONDS)
        assert runs.status(run_id) == "queued", "nothing can start a run while the broker is away"
        assert api.runtime.bus.pending_count() == 1, "the run's task waits in the outbox"

        broker.restore()
        restored = time.monotonic()
        eventually(
            lambda: api.runtime.bus.pending_count() == 0,
            timeout=SENT_WITHIN_SECONDS,
            interval=0.05,
            what="the outbox relay to send the run's task",
        )
        sent_after = time.monotonic() - restored
        eventually(lambda: runs.status(run_id) != "queued", timeout=60, interval=0.2, what="the run to start")
        started_after = time.monotonic() - restored
        finished = eventually(lambda: runs.ended(run_id), timeout=120, interval=0.5, what="the run to finish")

    run = runs.run(run_id)
    figures(
        "training_request_during_redis_outage", sent=1, accepted=1, lost=0, duplicated=run["attempts"] - 1, errors=0
    )
    print(f"sent {sent_after:.1f} s and started {started_after:.1f} s after Redis returned")
    assert finished == "succeeded", run["failure_reason"]
    assert run["attempts"] == 1, "one execution"
    assert [event["payload"]["run_id"] for event in published(api.runtime, "training.completed")] == [run_id]


def test_an_attempt_that_loses_object_storage_is_retried_until_the_run_trains(
    platform, worker, proxy, s3_server, logs
) -> None:
    api = platform("training")
    runs = RunApi(api)
    host, port = s3_server.endpoint.split(":")
    storage = proxy(host, int(port))
    with worker("training", s3_endpoint=storage.address):
        storage.cut()
        run_id = runs.request_small_run()["id"]
        eventually(
            lambda: logs.find(event="run_transient_error", run_id=run_id), timeout=60, what="the attempt to fail"
        )
        storage.restore()
        finished = eventually(lambda: runs.ended(run_id), timeout=150, interval=0.5, what="the run to finish")

    run = runs.run(run_id)
    assert finished == "succeeded", run["failure_reason"]
    assert run["attempts"] == 2, "the failed attempt, then the one that trained"
    assert [event["payload"]["run_id"] for event in published(api.runtime, "training.completed")] == [run_id]
