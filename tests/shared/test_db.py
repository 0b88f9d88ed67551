"""A newer release adds nullable columns and indexes to tables an older release created, on SQLite and PostgreSQL
alike."""

from __future__ import annotations

import pytest
from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, insert, inspect, select

from shared.db import Database


def _table(metadata: MetaData, *extra: Column) -> Table:
    return Table("snapshots", metadata, Column("id", Integer, primary_key=True), Column("name", String(20)), *extra)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path, postgres_database) -> str:
    return f"sqlite:///{tmp_path / 'db.sqlite3'}" if request.param == "sqlite" else postgres_database()


def test_a_new_nullable_column_is_added_and_old_rows_keep_their_values(database_url: str) -> None:
    old = Database(database_url, MetaData())
    _table(old.metadata)
    old.create_all()
    with old.engine.begin() as conn:
        conn.execute(insert(old.metadata.tables["snapshots"]).values(id=1, name="before"))
    old.dispose()

    new = Database(database_url, MetaData())
    table = _table(new.metadata, Column("split_digests", JSON, nullable=True))
    new.create_all()
    new.create_all()  # a second start finds nothing to add
    with new.engine.begin() as conn:
        conn.execute(insert(table).values(id=2, name="after", split_digests={"test": "ab"}))
        rows = conn.execute(select(table.c.id, table.c.name, table.c.split_digests).order_by(table.c.id)).all()
    assert [tuple(row) for row in rows] == [(1, "before", None), (2, "after", {"test": "ab"})]
    new.dispose()


def test_a_new_required_column_is_refused_with_a_clear_message(database_url: str) -> None:
    old = Database(database_url, MetaData())
    _table(old.metadata)
    old.create_all()
    old.dispose()

    new = Database(database_url, MetaData())
    _table(new.metadata, Column("owner", String(20), nullable=False))
    with pytest.raises(RuntimeError, match=r"lacks column owner.*migrate the database first"):
        new.create_all()
    new.dispose()


def test_a_new_index_is_added_to_an_existing_table_once(database_url: str) -> None:
    old = Database(database_url, MetaData())
    _table(old.metadata)
    old.create_all()
    with old.engine.begin() as conn:
        conn.execute(insert(old.metadata.tables["snapshots"]).values(id=1, name="before"))
    old.dispose()

    new = Database(database_url, MetaData())
    table = _table(new.metadata)
    Index("ix_snapshots_name", table.c.name)
    new.create_all()
    new.create_all()  # a second start finds it there
    with new.engine.connect() as conn:
        indexes = {index["name"]: index["column_names"] for index in inspect(conn).get_indexes("snapshots")}
        assert indexes["ix_snapshots_name"] == ["name"]
        assert conn.execute(select(table.c.name)).scalars().all() == ["before"]
    new.dispose()


def test_a_new_unique_index_that_old_rows_break_is_refused_with_a_clear_message(database_url: str) -> None:
    old = Database(database_url, MetaData())
    _table(old.metadata)
    old.create_all()
    with old.engine.begin() as conn:
        conn.execute(insert(old.metadata.tables["snapshots"]), [{"id": 1, "name": "same"}, {"id": 2, "name": "same"}])
    old.dispose()

    new = Database(database_url, MetaData())
    table = _table(new.metadata)
    Index("uq_snapshots_name", table.c.name, unique=True)
    with pytest.raises(RuntimeError, match=r"lacks unique index uq_snapshots_name, which its rows break"):
        new.create_all()
    with new.engine.connect() as conn:
        assert "uq_snapshots_name" not in {index["name"] for index in inspect(conn).get_indexes("snapshots")}
    new.dispose()
