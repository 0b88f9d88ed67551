"""SQLAlchemy 2 engine and sessions for one service's database.

Each service owns its tables (its own `MetaData`) and its own `DATABASE_URL`. SQLite under the data
directory is the embedded default; PostgreSQL is used where several processes write concurrently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, create_engine, event, insert, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.schema import CreateIndex

from shared.logging import get_logger

log = get_logger(__name__)


class DatabaseUnavailable(Exception):
    """The service's database does not answer."""


def declarative_base() -> type[DeclarativeBase]:
    """A fresh declarative base whose metadata also holds the shared event tables (outbox, inbox, dead letters)."""
    from shared.events.tables import define_event_tables

    class Base(DeclarativeBase):
        metadata = MetaData(
            naming_convention={
                "ix": "ix_%(column_0_label)s",
                "uq": "uq_%(table_name)s_%(column_0_N_name)s",
                "ck": "ck_%(table_name)s_%(constraint_name)s",
                "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
                "pk": "pk_%(table_name)s",
            }
        )

    define_event_tables(Base.metadata)
    return Base


class Database:
    def __init__(self, url: str, metadata: MetaData) -> None:
        self.url = url
        self.metadata = metadata
        self.engine = _create_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(flywheel_read_only=True), expire_on_commit=False
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def create_all(self) -> None:
        """Create missing tables, then add the nullable columns and the indexes that a newer release declares
        to tables an older one created. Additive changes need no migration step; anything else (a type change,
        a new NOT NULL column, a new unique index over rows that break it) is a deliberate migration and does
        not belong here."""
        self.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._add_missing_indexes()

    def _add_missing_columns(self) -> None:
        with self.engine.begin() as conn:
            present = inspect(conn)
            for table in self.metadata.sorted_tables:
                existing = {column["name"] for column in present.get_columns(table.name)}
                for column in table.columns:
                    if column.name in existing:
                        continue
                    if not column.nullable or column.server_default is not None or column.primary_key:
                        raise RuntimeError(
                            f"table {table.name} lacks column {column.name}, which is not a nullable column "
                            "this release can add by itself: migrate the database first"
                        )
                    kind = column.type.compile(dialect=self.engine.dialect)
                    # Processes start together: on PostgreSQL IF NOT EXISTS lets the second one pass; SQLite's
                    # BEGIN IMMEDIATE already made this transaction the only writer before it looked.
                    guard = "IF NOT EXISTS " if self.engine.dialect.name == "postgresql" else ""
                    conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN {guard}"{column.name}" {kind}'))
                    log.info("schema_column_added", table=table.name, column=column.name, type=kind)

    def _add_missing_indexes(self) -> None:
        """Indexes a newer release declares on an existing table (`create_all` creates a table's indexes only
        with the table). IF NOT EXISTS on both dialects, so two processes starting together both pass. A unique
        index that the table's rows break is refused with the table and index named."""
        with self.engine.begin() as conn:
            present = inspect(conn)
            for table in self.metadata.sorted_tables:
                existing = {index["name"] for index in present.get_indexes(table.name)}
                for index in sorted(table.indexes, key=lambda index: str(index.name)):
                    if index.name in existing:
                        continue
                    try:
                        with conn.begin_nested():
                            conn.execute(CreateIndex(index, if_not_exists=True))
                    except IntegrityError as exc:
                        raise RuntimeError(
                            f"table {table.name} lacks unique index {index.name}, which its rows break: "
                            f"migrate the database first ({str(exc.orig)[:200]})"
                        ) from exc
                    log.info("schema_index_added", table=table.name, index=index.name)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: committed when the block ends normally, rolled back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A unit of work that only reads. On SQLite it starts a plain (deferred) transaction, so it neither
        takes nor waits for the write lock; WAL gives it a consistent snapshot while a writer works."""
        session = self._read_sessions()
        try:
            yield session
        finally:
            session.close()  # ends the transaction and detaches what was read, still loaded

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"database {self.safe_url} does not answer: {exc.__class__.__name__}") from exc

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def insert_if_absent(session: Session, entity: Any, values: dict[str, Any]) -> None:
    """Insert the row unless one with the same primary key or unique values exists, without failing the caller's
    transaction: two consumers creating the same row at once both go on, neither retries."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(entity).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        session.execute(sqlite.insert(entity).values(**values).on_conflict_do_nothing())
    else:  # another backend: a savepoint absorbs the duplicate
        try:
            with session.begin_nested():
                session.execute(insert(entity).values(**values))
        except IntegrityError:
            pass


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # pysqlite's own transaction handling is turned off so that every transaction starts with
        # BEGIN IMMEDIATE: writers queue on the busy timeout instead of failing on a read-to-write upgrade.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30, "isolation_level": None}
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            read_only = conn.get_execution_options().get("flywheel_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        kwargs.update(pool_size=10, max_overflow=20, connect_args={"connect_timeout": 5})
    return create_engine(url, **kwargs)
