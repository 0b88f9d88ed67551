"""Dead letters: listing and replaying the events a consumer could not handle.

Every service serves the same two operator endpoints (internal token), which the CLI's
`flywheel dead-letters list|replay` calls across all five services.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import current_app
from flask_smorest import Blueprint
from marshmallow import Schema, fields
from sqlalchemy import select, update

from shared.auth import require_internal
from shared.errors import NotFound
from shared.events.tables import event_tables
from shared.schemas import Timestamp

if TYPE_CHECKING:
    from shared.runtime import Runtime


class DeadLetterSchema(Schema):
    id = fields.Integer()
    consumer = fields.String()
    event_id = fields.String(allow_none=True)
    event_type = fields.String(allow_none=True)
    error = fields.String()
    attempts = fields.Integer()
    created_at = Timestamp()
    replayed_at = Timestamp(allow_none=True)
    replay_count = fields.Integer()
    message = fields.Dict()


class DeadLetterListSchema(Schema):
    dead_letters = fields.List(fields.Nested(DeadLetterSchema))


class DeadLetterQuery(Schema):
    include_replayed = fields.Boolean(load_default=False)
    limit = fields.Integer(load_default=100)


def list_dead_letters(runtime: Runtime, *, include_replayed: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    table = event_tables(runtime.db.metadata).dead_letters
    query = select(table).order_by(table.c.id.desc()).limit(max(1, min(limit, 1000)))
    if not include_replayed:
        query = query.where(table.c.replayed_at.is_(None))
    with runtime.db.session() as session:
        return [dict(row._mapping) for row in session.execute(query)]


def replay_dead_letter(runtime: Runtime, dead_letter_id: int) -> dict[str, Any]:
    """Send the original message again to the one consumer that failed it; its inbox still dedupes it."""
    table = event_tables(runtime.db.metadata).dead_letters
    with runtime.db.session() as session:
        row = session.execute(select(table).where(table.c.id == dead_letter_id)).first()
        if row is None:
            raise NotFound(f"dead letter {dead_letter_id} does not exist in {runtime.service}")
        runtime.celery.send_task(row.consumer, args=[row.message], queue=runtime.service, retry=False)
        session.execute(
            update(table)
            .where(table.c.id == dead_letter_id)
            .values(replayed_at=datetime.now(UTC), replay_count=table.c.replay_count + 1)
        )
        return dict(session.execute(select(table).where(table.c.id == dead_letter_id)).one()._mapping)


blp = Blueprint("dead_letters", __name__, url_prefix="/v1/admin/dead-letters", description="Dead-letter records")


@blp.get("")
@require_internal
@blp.arguments(DeadLetterQuery, location="query")
@blp.response(200, DeadLetterListSchema)
def get_dead_letters(query: dict[str, Any]) -> dict[str, Any]:
    runtime = current_app.extensions["flywheel"]
    return {"dead_letters": list_dead_letters(runtime, **query)}


@blp.post("/<int:dead_letter_id>/replay")
@require_internal
@blp.response(202, DeadLetterSchema)
def post_replay(dead_letter_id: int) -> dict[str, Any]:
    return replay_dead_letter(current_app.extensions["flywheel"], dead_letter_id)
