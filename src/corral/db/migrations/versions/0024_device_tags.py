"""device tags: an indexed (tag, device) table beside the devices.tags column

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 06:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'device_tags',
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('tag', sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE',
                                name=op.f('fk_device_tags_device_id_devices')),
        sa.PrimaryKeyConstraint('device_id', 'tag', name=op.f('pk_device_tags')),
    )
    op.create_index('ix_device_tags_tag_device', 'device_tags', ['tag', 'device_id'])
    # the tags devices already carry (JITP gave them): one statement, no rows through Python
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("INSERT INTO device_tags (device_id, tag) SELECT DISTINCT d.id, t.value "
                   "FROM devices d, json_array_elements_text(d.tags) AS t(value) "
                   "WHERE json_typeof(d.tags) = 'array'")
    else:
        op.execute("INSERT OR IGNORE INTO device_tags (device_id, tag) SELECT d.id, t.value "
                   "FROM devices d, json_each(d.tags) AS t WHERE json_type(d.tags) = 'array'")


def downgrade() -> None:
    op.drop_index('ix_device_tags_tag_device', table_name='device_tags')
    op.drop_table('device_tags')
