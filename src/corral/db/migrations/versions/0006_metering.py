"""metering plans allowances warnings

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 11:00:00
"""

from __future__ import annotations

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled in by the work that adds these tables
    pass


def downgrade() -> None:
    pass
