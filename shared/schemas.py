"""Marshmallow pieces every service's schemas share: the error envelope, the timestamp field, and the rule for
partner-given identifiers.

- `ErrorSchema` is the body of every error a service answers (`shared/http.py` builds it with
  `shared.errors.error_body`); the OpenAPI documents name it for every documented error response.
- `Timestamp` writes RFC 3339 with its offset whatever the database gave back: SQLite keeps no time zone, so a
  `DateTime(timezone=True)` column comes back naive there (it was stored as UTC); PostgreSQL returns it aware.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from marshmallow import Schema, fields, validate

PRINTABLE = validate.Regexp(
    r"\A[^\x00-\x1f\x7f]*\Z", error="control characters (NUL, tabs, line breaks) are not allowed in an identifier"
)
"""For a partner's own identifiers (a data subject's id): stored in text columns, which on PostgreSQL cannot
hold NUL, and shown in reports, where control characters only mislead."""


class ErrorDetailSchema(Schema):
    code = fields.String(
        required=True, metadata={"description": "machine-readable, snake_case: `not_found`, `validation_failed`, ..."}
    )
    message = fields.String(required=True, metadata={"description": "what went wrong, for a person"})
    details = fields.Dict(
        required=True,
        metadata={"description": "context; a validation error lists each bad field under `fields`"},
    )


class ErrorSchema(Schema):
    """`{"error": {"code", "message", "details"}}`: what every error answer carries (component `Error`; it
    replaces flask-smorest's own, whose shape no answer has)."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class Timestamp(fields.DateTime):
    """An RFC 3339 timestamp with its offset (`2026-01-01T12:00:00.123456+00:00`); a naive value is UTC."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("format", "iso")
        super().__init__(**kwargs)

    def _serialize(self, value: dt.datetime | None, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return super()._serialize(value, attr, obj, **kwargs)
