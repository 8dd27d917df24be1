"""Duo integrations: relying parties that speak the Duo Auth API

One row per integration: its public key (`ikey`), its secret key sealed with the server's
secret box (never in plain text), how its approvals match a number, and the domain that turns
a Duo username into a tapprove user's email.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10 10:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'integration',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('ikey', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column('skey_sealed', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('match_mode', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('username_domain', sqlmodel.sql.sqltypes.AutoString(length=253), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_integration')),
    )
    op.create_index(op.f('ix_integration_ikey'), 'integration', ['ikey'], unique=True)
    op.create_index(op.f('ix_integration_name'), 'integration', ['name'], unique=True)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_integration_name'), table_name='integration')
    op.drop_index(op.f('ix_integration_ikey'), table_name='integration')
    op.drop_table('integration')
