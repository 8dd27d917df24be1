"""Security notices to the account owner, queued through the outbox in the caller's transaction."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession

from app.approval.model import PendingApproval
from app.core.clock import rfc3339
from app.db.models import Device, User
from app.delivery import outbox
from app.services import Services

NOTICE_TTL = 24 * 3600


async def device_added(
    svc: Services, db: AsyncSession, user: User, device: Device, now: float
) -> None:
    """'A device was added to your account; not you? revoke it' (NIST SP 800-63B-4 §4.1.2)."""
    outbox.enqueue(
        db,
        channel="email",
        recipient=user.email,
        template="device_added",
        payload={
            "device_name": device.name,
            "at": rfc3339(now),
            "platform": device.platform,
            "account_url": f"{svc.settings.public_url}/account",
        },
        user_id=user.id,
        now=now,
        ttl=NOTICE_TTL,
    )


async def fraud_reported(
    svc: Services, db: AsyncSession, user: User, approval: PendingApproval, now: float
) -> None:
    """'A suspicious sign-in was reported from your phone; sign-in is locked.'"""
    context = approval.context
    outbox.enqueue(
        db,
        channel="email",
        recipient=user.email,
        template="fraud_reported",
        payload={
            "browser": context.browser,
            "at": rfc3339(now),
            "os": context.os,
            "ip": context.ip,
            "account_url": f"{svc.settings.public_url}/account",
        },
        user_id=user.id,
        now=now,
        ttl=NOTICE_TTL,
    )
