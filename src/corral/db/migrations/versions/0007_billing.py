"""billing subscriptions payments invoices

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21 11:00:00
"""

from __future__ import annotations

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled in by the work that adds these tables
    pass


def downgrade() -> None:
    pass
