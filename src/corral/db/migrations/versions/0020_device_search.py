"""device name / serial number substring search: pg_trgm GIN indexes, SQLite FTS5 trigram

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 04:20:00
"""

from __future__ import annotations

from alembic import op

from corral.devices import search

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
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
        search.sqlite_install(op)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_devices_serial_trgm")
        op.execute("DROP INDEX IF EXISTS ix_devices_name_trgm")
    else:
        search.sqlite_uninstall(op)
