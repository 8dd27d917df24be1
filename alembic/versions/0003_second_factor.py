"""Users remember that they had a second factor; enrollment codes remember who vouched

`user.second_factor_at` (when the account first had a device) and `user.device_enrollments`
(devices ever enrolled) are filled in from the device table, revoked devices included, so an
account whose devices were all revoked before this upgrade is not treated as brand new.
`enrollmentcode.kind` says who made a code; codes still in flight during the upgrade (they
live 10 minutes) become `first_device` codes, the strictest kind: they enroll only on an
account that never had a device.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09 10:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column('user', sa.Column('second_factor_at', sa.DateTime(), nullable=True))
    op.add_column(
        'user',
        sa.Column('device_enrollments', sa.Integer(), server_default='0', nullable=False),
    )
    op.add_column(
        'enrollmentcode',
        sa.Column(
            'kind',
            sqlmodel.sql.sqltypes.AutoString(length=16),
            server_default='first_device',
            nullable=False,
        ),
    )
    op.add_column('enrollmentcode', sa.Column('enrollments_seen', sa.Integer(), nullable=True))
    # The default only filled the rows that were there; every new code names its kind.
    with op.batch_alter_table('enrollmentcode') as batch:
        batch.alter_column(
            'kind', existing_type=sqlmodel.sql.sqltypes.AutoString(length=16), server_default=None
        )

    user = sa.table(
        'user',
        sa.column('id', sa.String()),
        sa.column('second_factor_at', sa.DateTime()),
        sa.column('device_enrollments', sa.Integer()),
    )
    device = sa.table(
        'device', sa.column('user_id', sa.String()), sa.column('created_at', sa.DateTime())
    )
    of_user = device.c.user_id == user.c.id
    op.execute(
        user.update()
        .where(sa.exists().where(of_user))
        .values(
            second_factor_at=sa.select(sa.func.min(device.c.created_at))
            .where(of_user)
            .scalar_subquery(),
            device_enrollments=sa.select(sa.func.count()).where(of_user).scalar_subquery(),
        )
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('enrollmentcode') as batch:
        batch.drop_column('enrollments_seen')
        batch.drop_column('kind')
    with op.batch_alter_table('user') as batch:
        batch.drop_column('device_enrollments')
        batch.drop_column('second_factor_at')
