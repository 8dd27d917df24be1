"""Audit rows remember the Redis Stream entry they were copied from

Approval audit lines now reach SQL through a Redis Stream (app.store.audit_stream); the
entry id makes a second copy of one line a no-op.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 18:40:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column(
        'auditevent',
        sa.Column('stream_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    )
    op.create_index(op.f('ix_auditevent_stream_id'), 'auditevent', ['stream_id'], unique=True)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_auditevent_stream_id'), table_name='auditevent')
    with op.batch_alter_table('auditevent') as batch:
        batch.drop_column('stream_id')
