"""Duo enrollment: an integration may enroll a user's first device only if allowed

`integration.allow_enroll` (false for every integration made before, and by default):
whether the integration may call `enroll` / `enroll_status` (docs/duo-compat.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 09:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column(
        'integration',
        sa.Column('allow_enroll', sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('integration') as batch:
        batch.drop_column('allow_enroll')
