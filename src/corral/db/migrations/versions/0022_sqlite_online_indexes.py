"""SQLite: the partial indexes of online devices are declared ``WHERE online = 1``

SQLite uses a partial index only when the query states its WHERE term, and SQLAlchemy
renders a boolean column test as ``online = 1`` there; indexes declared ``WHERE online``
were never used (a product's online count scanned every device: bench B15). PostgreSQL
keeps ``WHERE online``, which its queries (``WHERE devices.online``) match.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 06:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None

INDEXES = (("ix_devices_product_online", "product_id"), ("ix_devices_node_online", "node_id"))


def _recreate(where: str) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name, column in INDEXES:
        op.drop_index(name, table_name="devices")
        op.create_index(name, "devices", [column], sqlite_where=sa.text(where))


def upgrade() -> None:
    _recreate("online = 1")


def downgrade() -> None:
    _recreate("online")
