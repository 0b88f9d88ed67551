"""The event envelope: what every message on the bus looks like, validated on send and on receipt."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate, validates_schema

from shared.logging import current_trace_id, new_trace_id


class InvalidEvent(Exception):
    """An envelope or payload that does not match the catalog. Never retried: it goes to the dead letters."""

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message if not errors else f"{message}: {errors}")
        self.errors = errors or {}


class EnvelopeSchema(Schema):
    class Meta:
        unknown = RAISE

    event_id = fields.UUID(required=True)
    type = fields.String(required=True, validate=validate.Length(min=1, max=100))
    version = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    occurred_at = fields.AwareDateTime(required=True, default_timezone=UTC)
    tenant = fields.String(required=True, allow_none=True, validate=validate.Length(max=64))
    trace_id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    payload = fields.Dict(required=True)

    @validates_schema
    def _known_type(self, data: dict[str, Any], **_: Any) -> None:
        from shared.events.catalog import CATALOG

        spec = CATALOG.get(data["type"])
        if spec is None:
            raise ValidationError(f"unknown event type {data['type']!r}", field_name="type")
        if data["version"] != spec.version:
            raise ValidationError(
                f"{data['type']} is version {spec.version} in this catalog, got {data['version']}",
                field_name="version",
            )
        errors = spec.schema(unknown=EXCLUDE).validate(data["payload"])
        if errors:
            raise ValidationError({"payload": errors})


@dataclass(frozen=True)
class Envelope:
    type: str
    payload: dict[str, Any]
    tenant: str | None
    trace_id: str
    version: int
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    occurred_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: the payload is already plain JSON, and a deep copy of a 500-item batch costs
        # more than the rest of a push (measured by the ingestion benchmark, bench/ingestion/).
        return {
            "event_id": self.event_id,
            "type": self.type,
            "version": self.version,
            "occurred_at": self.occurred_at,
            "tenant": self.tenant,
            "trace_id": self.trace_id,
            "payload": self.payload,
        }


_schema = EnvelopeSchema()


def make_envelope(
    event_type: str, payload: dict[str, Any], *, tenant: str | None, trace_id: str | None = None
) -> Envelope:
    """Build an envelope, validating its payload strictly (unknown fields refused) once; the envelope's own
    fields are built here, so they need no second check. The trace id defaults to the current context's."""
    from shared.events.catalog import CATALOG

    spec = CATALOG.get(event_type)
    if spec is None:
        raise InvalidEvent(f"unknown event type {event_type!r}")
    errors = spec.schema().validate(payload)
    if errors:
        raise InvalidEvent(f"invalid {event_type} payload", errors)
    if tenant is not None and (not isinstance(tenant, str) or len(tenant) > 64):
        raise InvalidEvent("invalid event envelope", {"tenant": ["a string of at most 64 characters"]})
    return Envelope(
        type=event_type,
        payload=payload,
        tenant=tenant,
        trace_id=(trace_id or current_trace_id() or new_trace_id())[:128],
        version=spec.version,
    )


def validate_envelope(message: Any) -> Envelope:
    """Parse a received message into an Envelope, or raise InvalidEvent naming every bad field."""
    if not isinstance(message, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(message).__name__}")
    try:
        data = _schema.load(message)
    except ValidationError as exc:
        raise InvalidEvent("invalid event envelope", exc.normalized_messages()) from exc
    return Envelope(
        type=data["type"],
        payload=message["payload"],
        tenant=data["tenant"],
        trace_id=data["trace_id"],
        version=data["version"],
        event_id=str(data["event_id"]),
        occurred_at=data["occurred_at"].isoformat(),
    )
