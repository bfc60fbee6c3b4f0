"""Alembic environment for the catalog. Migrations run only through `CatalogDB.migrate()`, which hands
over a connection already inside the write transaction (see `mintd.catalog.db`)."""

from alembic import context

from mintd.catalog.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("catalog migrations run through mintd.catalog.db.CatalogDB.migrate()")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
