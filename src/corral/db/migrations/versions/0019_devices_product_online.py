"""a partial index of a product's online devices (fleet health counts them per request) and
device vitals by product and time (fleet health's newest reports)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 04:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_devices_product_online', 'devices', ['product_id'],
                    sqlite_where=sa.text('online'), postgresql_where=sa.text('online'))
    op.create_index('ix_device_vitals_product_at', 'device_vitals', ['product_id', 'at'])


def downgrade() -> None:
    op.drop_index('ix_device_vitals_product_at', table_name='device_vitals')
    op.drop_index('ix_devices_product_online', table_name='devices')
