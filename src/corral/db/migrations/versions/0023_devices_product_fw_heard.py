"""an index of a product's devices by firmware version and last heard: the console's and the
API's device list filtered by firmware version, in its default order (last heard), reads a
page from the index instead of sorting every device on that version (bench B15: 50,000 rows
sorted per page at a million devices)

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 06:50:00
"""

from __future__ import annotations

from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_devices_product_fw_heard', 'devices',
                    ['product_id', 'firmware_version', 'last_heard', 'id'])


def downgrade() -> None:
    op.drop_index('ix_devices_product_fw_heard', table_name='devices')
