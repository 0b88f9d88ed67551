"""Tables every service keeps for the bus, in its own database.

- `event_outbox`: events written in the same transaction as the change that caused them, then relayed to
  Redis. If Redis is down the change still commits and the relay delivers later; no event ever names a
  row that was rolled back.
- `event_inbox`: one row per (consumer, event_id) handled, written in the handler's transaction, which
  makes at-least-once delivery take effect exactly once.
- `dead_letters`: events that still failed after their retries (or were invalid), kept for replay.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text, UniqueConstraint


@dataclass(frozen=True)
class EventTables:
    outbox: Table
    inbox: Table
    dead_letters: Table


def define_event_tables(metadata: MetaData) -> EventTables:
    outbox = Table(
        "event_outbox",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("event_type", String(100), nullable=False),
        Column("envelope", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=True, index=True),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text, nullable=True),
    )
    inbox = Table(
        "event_inbox",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("consumer", String(150), nullable=False),
        Column("event_id", String(36), nullable=False),
        Column("handled_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("consumer", "event_id"),
    )
    dead_letters = Table(
        "dead_letters",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("consumer", String(150), nullable=False),
        Column("event_id", String(36), nullable=True, index=True),
        Column("event_type", String(100), nullable=True),
        Column("message", JSON, nullable=False),
        Column("error", Text, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("replayed_at", DateTime(timezone=True), nullable=True),
        Column("replay_count", Integer, nullable=False, default=0),
    )
    tables = EventTables(outbox=outbox, inbox=inbox, dead_letters=dead_letters)
    metadata.info["event_tables"] = tables
    return tables


def event_tables(metadata: MetaData) -> EventTables:
    return metadata.info["event_tables"]
