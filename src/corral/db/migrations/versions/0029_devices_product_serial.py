"""an index of a product's devices by serial number: the console's search box matches a
serial-number prefix within one product; with only the global serial index, SQLite's planner
(given statistics of a product whose devices have no serial) walked the whole product instead

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-05 08:15:00
"""

from __future__ import annotations

from alembic import op

revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_devices_product_serial', 'devices', ['product_id', 'serial_number'])


def downgrade() -> None:
    op.drop_index('ix_devices_product_serial', table_name='devices')
