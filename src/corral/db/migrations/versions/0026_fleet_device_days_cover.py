"""fleet health: the per-device days are read from one covering index

The "most troubled devices" part of fleet health sums a product's per-device days of the
range by device. With ``(product_id, day)`` alone every matching row was also read from
the table, twice (once for disconnects, once for errors). The index now carries the device
and both counts, so one index-only pass answers both lists (bench B16).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-05 07:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_fleet_device_days_product_day', table_name='fleet_device_days')
    op.create_index('ix_fleet_device_days_product_day', 'fleet_device_days',
                    ['product_id', 'day', 'device_id', 'disconnects', 'errors'])


def downgrade() -> None:
    op.drop_index('ix_fleet_device_days_product_day', table_name='fleet_device_days')
    op.create_index('ix_fleet_device_days_product_day', 'fleet_device_days',
                    ['product_id', 'day'])
