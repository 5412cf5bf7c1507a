"""dynamic groups: devices by product and platform, in last-heard order

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-05 13:05:00
"""

from __future__ import annotations

from alembic import op

revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_devices_product_platform', 'devices',
                    ['product_id', 'platform_id', 'last_heard', 'id'])


def downgrade() -> None:
    op.drop_index('ix_devices_product_platform', table_name='devices')
