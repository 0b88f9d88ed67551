"""The envelope is validated on send and on receipt; bad events are rejected with a clear reason."""

from __future__ import annotations

import uuid

import pytest

from shared.events.catalog import CATALOG, task_name
from shared.events.envelope import InvalidEvent, make_envelope, validate_envelope

DATASET = {
    "dataset_id": "ds_1",
    "name": "reviews",
    "task_type": "text_classification",
    "labels": ["neg", "pos"],
    "overlap": 1,
    "retrain_threshold": None,
}


def valid_message() -> dict:
    return make_envelope("dataset.changed", {"dataset": DATASET}, tenant="ptn_1", trace_id="trace-1").to_dict()


def test_a_valid_envelope_round_trips() -> None:
    message = valid_message()
    envelope = validate_envelope(message)
    assert envelope.type == "dataset.changed"
    assert envelope.trace_id == "trace-1"
    assert envelope.tenant == "ptn_1"
    assert envelope.payload["dataset"]["labels"] == ["neg", "pos"]
    uuid.UUID(envelope.event_id)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.pop("event_id"), "event_id"),
        (lambda m: m.update(event_id="not-a-uuid"), "event_id"),
        (lambda m: m.update(type="item.exploded"), "type"),
        (lambda m: m.update(version=7), "version"),
        (lambda m: m.update(occurred_at="yesterday"), "occurred_at"),
        (lambda m: m.pop("trace_id"), "trace_id"),
        (lambda m: m.update(payload={"dataset": {"name": "x"}}), "payload"),
        (lambda m: m.update(surprise=1), "surprise"),
    ],
)
def test_a_bad_envelope_is_rejected_naming_the_field(mutate, field: str) -> None:
    message = valid_message()
    mutate(message)
    with pytest.raises(InvalidEvent) as caught:
        validate_envelope(message)
    assert field in caught.value.errors, caught.value.errors


def test_a_non_object_message_is_rejected() -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        validate_envelope(["not", "an", "envelope"])


def test_make_envelope_refuses_a_bad_payload_before_it_is_sent() -> None:
    with pytest.raises(InvalidEvent) as caught:
        make_envelope("item.ingested", {"dataset": DATASET, "items": []}, tenant="ptn_1")
    assert "items" in caught.value.errors


def test_every_catalog_event_names_a_known_producer_and_consumers() -> None:
    from shared.settings import SERVICES

    for spec in CATALOG.values():
        assert spec.producer in SERVICES, spec
        assert set(spec.consumers) <= set(SERVICES), spec
        assert set(spec.broadcast_to) <= set(spec.consumers), spec
    assert task_name("labeling", "item.ingested") == "labeling.item.ingested"
