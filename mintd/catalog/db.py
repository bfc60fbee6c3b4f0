"""Opening the catalog database: engine, SQLite tuning, write transactions, migrations.

`CatalogDB` is the seam for scale-out: the same class opens the embedded SQLite file or a PostgreSQL
URL. The catalog works through Core connections rather than ORM sessions because no ORM object may
leave it and its hot paths (resolve, bulk register) must not pay for object construction.

SQLite specifics live only here. Writers take the write lock up front (BEGIN IMMEDIATE), so a
read-then-write transaction can never fail half way with SQLITE_BUSY; writers queue on busy_timeout
instead. Readers use WAL snapshots and never block writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from mintd.catalog import validate
from mintd.config import CatalogSettings

MIGRATIONS = Path(__file__).with_name("migrations")
_WRITE = "mintd_catalog_write"
# PostgreSQL advisory lock classes (the first of the two int4 keys), so mintd's locks never collide.
_MIGRATIONS_LOCK, _BLOB_LOCK = 0x6D696E74, 0x626C6F62  # "mint", "blob"
_XACT_LOCK = text("SELECT pg_advisory_xact_lock(:cls, :key)")
_XACT_LOCK_SHARED = text("SELECT pg_advisory_xact_lock_shared(:cls, :key)")
_TRY_XACT_LOCK = text("SELECT pg_try_advisory_xact_lock(:cls, :key)")


class CatalogDB:
    def __init__(
        self, url: str, *, busy_timeout_ms: int = 10_000, cache_mb: int = 64, migrate: bool = True
    ) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            database = self.url.database
            if not database or database == ":memory:":
                # Each pooled connection would see its own empty in-memory database.
                raise ValueError("catalog_url: SQLite needs a file path (sqlite:///path/catalog.db)")
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            self.url, pool_pre_ping=not self.is_sqlite, json_serializer=validate.dump_json
        )
        if self.is_sqlite:
            _tune_sqlite(self.engine, busy_timeout_ms, cache_mb)
        if migrate:
            self.migrate()

    @classmethod
    def from_settings(cls, settings: CatalogSettings, data_dir: Path) -> CatalogDB:
        url = settings.catalog_url or f"sqlite:///{Path(data_dir).resolve() / 'catalog.db'}"
        return cls(url, busy_timeout_ms=settings.catalog_busy_timeout_ms, cache_mb=settings.catalog_cache_mb)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A consistent snapshot for reads (rolled back on exit: nothing to commit)."""
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: commits on success, rolls back on any exception."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    def migrate(self) -> None:
        """Bring the schema to the newest version (a no-op when it is already there).

        Runs inside one write transaction, so processes starting together upgrade once: the others
        wait (SQLite: for the write lock; PostgreSQL: for an advisory lock taken before Alembic reads
        the version table), then find the schema at head. PostgreSQL's DDL is transactional, so a
        replica killed mid-migration leaves the old schema, not half of the new one.
        """
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(_XACT_LOCK, {"cls": _MIGRATIONS_LOCK, "key": 0})
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def blob_lock(self, sha: str, *, exclusive: bool) -> Iterator[Connection | None]:
        """Cross-replica lock on one blob hash, held until the block exits: savers hold it shared from
        the blob's upload until its revision commits; the collector tries it exclusively and yields
        the connection to re-check references on, or None when a saver holds it. SQLite has no such
        lock (one machine; the blob store's grace period covers it) and always grants."""
        if self.is_sqlite:
            with self.read() as conn:
                yield conn
            return
        key = {"cls": _BLOB_LOCK, "key": int.from_bytes(bytes.fromhex(sha[:8]), "big", signed=True)}
        with self.engine.connect() as conn, conn.begin():  # the lock ends with this transaction
            if not exclusive:
                conn.execute(_XACT_LOCK_SHARED, key)
                yield conn
            elif conn.execute(_TRY_XACT_LOCK, key).scalar():
                yield conn
            else:
                yield None

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config() -> Config:
    """Alembic config for the package's migrations. To write a new migration after changing models.py:
    `command.revision(cfg, message=..., autogenerate=True)` with `cfg.attributes["connection"]` set to a
    connection on a database at head; then review the generated file by hand."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _tune_sqlite(engine: Engine, busy_timeout_ms: int, cache_mb: int) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver must not BEGIN on its own; on_begin does
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",  # readers never block the writer, and vice versa
            # FULL: each commit is fsynced before it returns, so an acknowledged save also survives a
            # power loss (NORMAL would survive only process crashes); bulk imports batch their commits
            "synchronous=FULL",
            "foreign_keys=ON",
            f"busy_timeout={busy_timeout_ms}",
            f"cache_size=-{cache_mb * 1024}",  # KiB; caps memory per connection at any catalog size
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")
