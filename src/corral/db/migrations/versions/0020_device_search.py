"""device name / serial number substring search: pg_trgm GIN indexes, SQLite FTS5 trigram

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 04:20:00
"""

from __future__ import annotations

from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

# the SQLite search table as this revision made it (a migration keeps its own SQL: the search
# code in corral.devices.search may change, this revision may not)
TABLE = "devices_search"
COLUMNS = ("name", "serial_number")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # an extension belongs to the database: two migrations of one database at once (two
        # schemas, two test workers) would both try to create it ("IF NOT EXISTS" is not
        # atomic), so the second waits for the first's commit
        op.execute("SELECT pg_advisory_xact_lock(hashtext('corral:create-extension:pg_trgm'))")
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        # the extension may live in another schema than corral's tables (installed earlier,
        # or by the operator): name its operator class with that schema
        schema = op.get_bind().exec_driver_sql(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
            "ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm'").scalar_one()
        opclass = f'"{schema}".gin_trgm_ops'
        op.execute("CREATE INDEX ix_devices_name_trgm ON devices USING gin "
                   f"(name {opclass})")
        op.execute("CREATE INDEX ix_devices_serial_trgm ON devices USING gin "
                   f"(serial_number {opclass})")
    else:
        _sqlite_install()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_devices_serial_trgm")
        op.execute("DROP INDEX IF EXISTS ix_devices_name_trgm")
    else:
        _sqlite_uninstall()


def _sqlite_install() -> None:
    """The FTS5 trigram table over devices.name and serial_number, its triggers, its rows."""
    cols = ", ".join(COLUMNS)
    new = ", ".join(f"new.{c}" for c in COLUMNS)
    old = ", ".join(f"old.{c}" for c in COLUMNS)
    _sqlite_uninstall()
    op.execute(f"CREATE VIRTUAL TABLE {TABLE} USING fts5({cols}, content='devices', "
               "content_rowid='rowid', tokenize='trigram')")
    op.execute(f"CREATE TRIGGER {TABLE}_ai AFTER INSERT ON devices BEGIN "
               f"INSERT INTO {TABLE}(rowid, {cols}) VALUES (new.rowid, {new}); END")
    op.execute(f"CREATE TRIGGER {TABLE}_ad AFTER DELETE ON devices BEGIN "
               f"INSERT INTO {TABLE}({TABLE}, rowid, {cols}) VALUES ('delete', old.rowid, "
               f"{old}); END")
    op.execute(f"CREATE TRIGGER {TABLE}_au AFTER UPDATE OF {cols} ON devices BEGIN "
               f"INSERT INTO {TABLE}({TABLE}, rowid, {cols}) VALUES ('delete', old.rowid, "
               f"{old}); INSERT INTO {TABLE}(rowid, {cols}) VALUES (new.rowid, {new}); END")
    op.execute(f"INSERT INTO {TABLE}({TABLE}) VALUES ('rebuild')")


def _sqlite_uninstall() -> None:
    for trigger in ("ai", "ad", "au"):
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_{trigger}")
    op.execute(f"DROP TABLE IF EXISTS {TABLE}")
