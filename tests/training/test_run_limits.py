"""Per-tenant run limits: a full queue answers 429 `too_many_runs` and records nothing; runs beyond the running
slots wait and are sent to the queue as slots free; other tenants are never held up; an event is never refused.

The limits are the service's configured ones (`TrainingConfig`), read from the same settings the service runs
with, so each test fills exactly the queue or the slots the service enforces.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from services.training.config import TrainingConfig
from services.training.consumers import handlers
from services.training.limits import tenant_lock_key
from shared.events.catalog import task_name
from shared.events.consumer import handle_once
from shared.events.envelope import make_envelope, validate_envelope
from shared.events.tables import event_tables
from tests.helpers import INTERNAL, in_lock_order
from tests.training.support import all_runs, text_items, write_snapshot

pytestmark = pytest.mark.timeout(120)

LABELS = ["databases", "numerics", "web"]


class Tenant:
    """One tenant's side of the run API: one snapshot, and as many distinct run requests on it as asked."""

    def __init__(self, service: Any, tenant: str) -> None:
        self.service = service
        self.tenant = tenant
        self.snapshot = write_snapshot(
            service.runtime.storage,
            tenant=tenant,
            dataset_id="ds_docs",
            task_type="text_classification",
            labels=LABELS,
            items=text_items(per_label=4),
        )
        self.requests = 0

    def body(self) -> dict[str, Any]:
        """A request no earlier one is identical to (its seed differs)."""
        self.requests += 1
        return {
            "tenant": self.tenant,
            "dataset_id": "ds_docs",
            "snapshot_id": self.snapshot["snapshot_id"],
            "hyperparameters": {"seed": self.requests},
        }

    def request(self, client: Any = None) -> Any:
        return (client or self.service.client).post("/v1/runs", json=self.body(), headers=INTERNAL)

    def accepted(self) -> dict[str, Any]:
        answer = self.request()
        assert answer.status_code == 202, answer.get_json()
        return answer.get_json()

    def cancel(self, run_id: str) -> None:
        answer = self.service.client.post(f"/v1/runs/{run_id}/cancel", headers=INTERNAL)
        assert answer.status_code == 202 and answer.get_json()["status"] == "cancelled", answer.get_json()

    def event(self) -> dict[str, Any]:
        """A `training.requested` event for this tenant, as labeling sends it."""
        payload = {
            "dataset_id": "ds_docs",
            "snapshot_id": self.snapshot["snapshot_id"],
            "manifest": self.snapshot["manifest"],
            "task_type": "text_classification",
            "labels": LABELS,
            "reason": "new labels",
            "hyperparameters": {"seed": 1000 + self.requests},
        }
        self.requests += 1
        return make_envelope("training.requested", payload, tenant=self.tenant).to_dict()


def outbox_rows(runtime: Any) -> list[tuple[str, dict[str, Any]]]:
    outbox = event_tables(runtime.db.metadata).outbox
    with runtime.db.session() as session:
        return [tuple(row) for row in session.execute(select(outbox.c.event_type, outbox.c.envelope)).all()]


def sent_run_ids(runtime: Any) -> list[str]:
    """The runs whose `training.run` task the service queued, in order."""
    return [envelope["args"][0] for kind, envelope in outbox_rows(runtime) if kind == "task:training.run"]


def consume(runtime: Any, message: dict[str, Any]) -> str:
    """Handle one `training.requested` as the service's consumer does (inbox, handler, one transaction)."""
    consumer, handler = task_name("training", "training.requested"), handlers.handlers["training.requested"]
    return handle_once(runtime, consumer, validate_envelope(message), handler, use_inbox=True)


@pytest.fixture
def training(platform):
    return platform("training")


def test_a_full_queue_answers_429_and_records_nothing(training) -> None:
    limits = TrainingConfig.of(training.runtime.settings)
    assert limits.max_queued_runs_per_tenant > 0, "the service must bound each tenant's queue"
    acme, globex = Tenant(training, "acme"), Tenant(training, "globex")
    queued = [acme.accepted() for _ in range(limits.max_queued_runs_per_tenant)]
    runs_before, outbox_before = [run.id for run in all_runs(training.runtime)], outbox_rows(training.runtime)

    refused = acme.request()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"].isdigit()
    error = refused.get_json()["error"]
    assert error["code"] == "too_many_runs"
    assert error["details"]["limit"] == "max_queued_runs_per_tenant"
    assert error["details"]["value"] == limits.max_queued_runs_per_tenant
    assert "max_queued_runs_per_tenant" in error["message"]
    assert [run.id for run in all_runs(training.runtime)] == runs_before, "no run recorded"
    assert outbox_rows(training.runtime) == outbox_before, "nothing queued or published"

    # An identical request is still answered with its run: it adds nothing to the queue.
    again = training.client.post("/v1/runs", json={**acme.body(), "hyperparameters": {"seed": 1}}, headers=INTERNAL)
    assert again.status_code == 200 and again.get_json()["id"] == queued[0]["id"]
    # Another tenant is not held up by acme's queue.
    assert globex.request().status_code == 202
    # A place that frees (a queued run cancelled) lets the next request through, and only that one.
    acme.cancel(queued[-1]["id"])
    assert acme.request().status_code == 202
    assert acme.request().status_code == 429

    # The answer is the documented one.
    operation = training.client.get("/openapi.json").get_json()["paths"]["/v1/runs"]["post"]
    documented = operation["responses"]["429"]
    assert "Retry-After" in documented["headers"]
    schema_name = documented["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    schemas = training.client.get("/openapi.json").get_json()["components"]["schemas"]
    body_name = schemas[schema_name]["properties"]["error"]["$ref"].rsplit("/", 1)[1]
    assert set(schemas[body_name]["properties"]) == {"code", "message", "details"}


def test_runs_beyond_the_running_slots_wait_and_are_sent_as_slots_free(training) -> None:
    limits = TrainingConfig.of(training.runtime.settings)
    slots = limits.max_running_runs_per_tenant
    assert 0 < slots < limits.max_queued_runs_per_tenant, "runs beyond the running slots must be able to wait"
    acme, globex = Tenant(training, "acme"), Tenant(training, "globex")
    started = [acme.accepted() for _ in range(slots)]
    waiting = [acme.accepted() for _ in range(2)]

    assert sent_run_ids(training.runtime) == [run["id"] for run in started]
    assert all(run["dispatched_at"] is not None for run in started)
    assert [run["status"] for run in waiting] == ["queued", "queued"]
    assert [run["dispatched_at"] for run in waiting] == [None, None]
    # Another tenant's run goes to the queue at once.
    other = globex.accepted()
    assert sent_run_ids(training.runtime)[-1] == other["id"]

    # The waiting run is cancelled without ever having been sent; the next one keeps its place.
    acme.cancel(waiting[0]["id"])
    assert waiting[0]["id"] not in sent_run_ids(training.runtime)
    # A run that ends frees its slot: the oldest waiting run is sent in the same transaction.
    acme.cancel(started[0]["id"])
    assert sent_run_ids(training.runtime)[-1] == waiting[1]["id"]
    shown = training.client.get(f"/v1/runs/{waiting[1]['id']}", headers=INTERNAL).get_json()
    assert shown["status"] == "queued" and shown["dispatched_at"] is not None
    assert len(sent_run_ids(training.runtime)) == slots + 2


def test_an_event_over_the_queue_limit_is_recorded_and_waits_its_turn(training) -> None:
    limits = TrainingConfig.of(training.runtime.settings)
    acme = Tenant(training, "acme")
    queued = [acme.accepted() for _ in range(limits.max_queued_runs_per_tenant)]
    assert acme.request().status_code == 429
    sent_before = sent_run_ids(training.runtime)

    message = acme.event()
    assert consume(training.runtime, message) == "handled"
    [recorded] = [run for run in all_runs(training.runtime) if run.source == "event"]
    assert recorded.status == "queued" and recorded.dispatched_at is None and recorded.trace_id == message["trace_id"]
    assert sent_run_ids(training.runtime) == sent_before, "it waits for a running slot like the others"
    # It is sent once the runs ahead of it have gone (here: cancelled, oldest first).
    for run in queued:
        acme.cancel(run["id"])
    assert recorded.id in sent_run_ids(training.runtime)


def test_two_requests_racing_for_the_last_place_get_one_run_on_postgres(platform, postgres_database) -> None:
    url = postgres_database()
    training = platform("training", database_url=url)
    limits = TrainingConfig.of(training.runtime.settings)
    acme = Tenant(training, "acme")
    for _ in range(limits.max_queued_runs_per_tenant - 1):
        acme.accepted()
    bodies = [acme.body(), acme.body()]

    def post(body: dict[str, Any]) -> int:
        return training.app.test_client().post("/v1/runs", json=body, headers=INTERNAL).status_code

    # Both requests queue on the tenant's lock while a third party holds it, then go one after the other.
    calls = [lambda body=body: post(body) for body in bodies]
    answers = in_lock_order(url, "SELECT pg_advisory_xact_lock(%s)", (tenant_lock_key("acme"),), calls)
    assert answers == [202, 429]
    queued = [run for run in all_runs(training.runtime) if run.status == "queued"]
    assert len(queued) == limits.max_queued_runs_per_tenant
