"""Offline passcodes, recovery codes and passkeys

`device` gets its sealed TOTP seed, when the device confirmed it, and the last time step used
(devices enrolled before get a seed over their socket on their next connection). New tables:
`recoverycode` (argon2id hashes, one salt per set) and `passkey` (WebAuthn credentials).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-14 10:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column(
        'device',
        sa.Column('passcode_seed', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    )
    op.add_column('device', sa.Column('passcode_confirmed_at', sa.DateTime(), nullable=True))
    op.add_column('device', sa.Column('passcode_last_step', sa.Integer(), nullable=True))
    op.create_table(
        'recoverycode',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('salt', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('code_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('used_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ['user_id'], ['user.id'], name=op.f('fk_recoverycode_user_id_user')
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_recoverycode')),
    )
    op.create_index(
        op.f('ix_recoverycode_user_id'), 'recoverycode', ['user_id'], unique=False
    )
    op.create_table(
        'passkey',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column(
            'credential_id', sqlmodel.sql.sqltypes.AutoString(length=1400), nullable=False
        ),
        sa.Column('public_key', sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=False),
        sa.Column('sign_count', sa.Integer(), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('aaguid', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_used_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_passkey_user_id_user')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_passkey')),
    )
    op.create_index(op.f('ix_passkey_credential_id'), 'passkey', ['credential_id'], unique=True)
    op.create_index(op.f('ix_passkey_user_id'), 'passkey', ['user_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_passkey_user_id'), table_name='passkey')
    op.drop_index(op.f('ix_passkey_credential_id'), table_name='passkey')
    op.drop_table('passkey')
    op.drop_index(op.f('ix_recoverycode_user_id'), table_name='recoverycode')
    op.drop_table('recoverycode')
    with op.batch_alter_table('device') as batch:
        batch.drop_column('passcode_last_step')
        batch.drop_column('passcode_confirmed_at')
        batch.drop_column('passcode_seed')
