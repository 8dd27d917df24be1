"""Initial schema

Users, devices, enrollment codes, API keys, trusted browsers, the audit log, email tokens
and the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 04:06:46.858354

"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('apikey',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('key_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_apikey'))
    )
    op.create_index(op.f('ix_apikey_key_hash'), 'apikey', ['key_hash'], unique=True)
    op.create_index(op.f('ix_apikey_name'), 'apikey', ['name'], unique=True)

    op.create_table('auditevent',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('ip', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('approval_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auditevent'))
    )
    op.create_index(op.f('ix_auditevent_at'), 'auditevent', ['at'], unique=False)
    op.create_index(op.f('ix_auditevent_user_id'), 'auditevent', ['user_id'], unique=False)

    op.create_table('outboxmessage',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('recipient', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('template', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('payload', sqlmodel.sql.sqltypes.AutoString(length=8000), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outboxmessage'))
    )
    op.create_index(op.f('ix_outboxmessage_next_attempt_at'), 'outboxmessage', ['next_attempt_at'], unique=False)
    op.create_index(op.f('ix_outboxmessage_status'), 'outboxmessage', ['status'], unique=False)
    op.create_index(op.f('ix_outboxmessage_user_id'), 'outboxmessage', ['user_id'], unique=False)

    op.create_table('user',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('password_hash', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('email_verified', sa.Boolean(), nullable=False),
    sa.Column('phone', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True),
    sa.Column('phone_verified', sa.Boolean(), nullable=False),
    sa.Column('sms_fallback', sa.Boolean(), nullable=False),
    sa.Column('locked', sa.Boolean(), nullable=False),
    sa.Column('locked_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('verified_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user'))
    )
    op.create_index(op.f('ix_user_email'), 'user', ['email'], unique=True)

    op.create_table('device',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('platform', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('public_jwk', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('push_provider', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
    sa.Column('push_token', sqlmodel.sql.sqltypes.AutoString(length=4096), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_device_user_id_user')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_device'))
    )
    op.create_index(op.f('ix_device_token_hash'), 'device', ['token_hash'], unique=True)
    op.create_index(op.f('ix_device_user_id'), 'device', ['user_id'], unique=False)

    op.create_table('emailtoken',
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('used_at', sa.DateTime(), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_emailtoken_user_id_user')),
    sa.PrimaryKeyConstraint('token_hash', name=op.f('pk_emailtoken'))
    )
    op.create_index(op.f('ix_emailtoken_user_id'), 'emailtoken', ['user_id'], unique=False)

    op.create_table('enrollmentcode',
    sa.Column('code_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('used_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_enrollmentcode_user_id_user')),
    sa.PrimaryKeyConstraint('code_hash', name=op.f('pk_enrollmentcode'))
    )
    op.create_index(op.f('ix_enrollmentcode_user_id'), 'enrollmentcode', ['user_id'], unique=False)

    op.create_table('trustedbrowser',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_agent', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('browser', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('os', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('ip', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_used_at', sa.DateTime(), nullable=True),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_trustedbrowser_user_id_user')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trustedbrowser'))
    )
    op.create_index(op.f('ix_trustedbrowser_token_hash'), 'trustedbrowser', ['token_hash'], unique=True)
    op.create_index(op.f('ix_trustedbrowser_user_id'), 'trustedbrowser', ['user_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema: drop every table, children before the tables they reference."""
    op.drop_table('trustedbrowser')
    op.drop_table('enrollmentcode')
    op.drop_table('emailtoken')
    op.drop_table('device')
    op.drop_table('user')
    op.drop_table('outboxmessage')
    op.drop_table('auditevent')
    op.drop_table('apikey')
