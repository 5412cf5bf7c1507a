"""firmware releases rollouts signing

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-21 11:00:00
"""

from __future__ import annotations

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # filled in by the work that adds these tables
    pass


def downgrade() -> None:
    pass
