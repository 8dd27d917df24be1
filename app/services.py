"""The per-process bag of adapters, built once from Settings and handed to every route."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from app.account_cache import AccountCache
from app.approval.store import ApprovalStore, Durability
from app.approval.waiters import Waiters
from app.core.clock import Clock, SystemClock
from app.core.tokens import new_id
from app.core.ttlcache import TtlCache
from app.db.engine import make_engine, make_sessionmaker
from app.db.models import ApiKey
from app.delivery.providers import build_providers
from app.delivery.push import Providers
from app.server_keys import KeyedHash, SecretBox, secret_key
from app.settings import Settings
from app.store.codes import OneTimeCodes
from app.store.events import EventBus
from app.store.jobs import JobQueue
from app.store.presence import Presence
from app.store.ratelimit import RateLimiter
from app.store.redis import KeySpace, RedisHandle, connect
from app.store.sessions import SessionStore
from app.store.webauthn import WebAuthnChallenges

# How long a revoked API key may still be accepted by a process that saw it live.
API_KEY_CACHE_SECONDS = 10.0


@dataclass
class Services:
    """Everything a request handler or a worker needs; no module-level connections."""

    settings: Settings
    clock: Clock
    redis_handle: RedisHandle
    keys: KeySpace
    engine: AsyncEngine
    db: async_sessionmaker[AsyncSession]
    events: EventBus
    approvals: ApprovalStore
    presence: Presence
    sessions: SessionStore
    limits: RateLimiter
    providers: Providers
    # Live API keys by token hash: every relying-party call needs one, and they rarely change.
    api_keys: TtlCache[str, ApiKey]
    accounts: AccountCache
    waiters: Waiters
    jobs: JobQueue  # delivery jobs (push, ack checks, SMS)
    codes: OneTimeCodes  # SMS sign-in codes, phone verification codes
    webauthn: WebAuthnChallenges  # passkey challenges
    process_id: str = field(default_factory=new_id)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    _boxes: dict[str, SecretBox] = field(default_factory=dict)

    @property
    def redis(self) -> aioredis.Redis:
        return self.redis_handle.client

    def secret_box(self, purpose: str) -> SecretBox:
        """The box sealing this purpose's secrets (app.server_keys), made on first use: the
        embedded default writes its key file only when something needs it."""
        box = self._boxes.get(purpose)
        if box is None:
            box = self._boxes[purpose] = SecretBox(secret_key(self.settings), purpose)
        return box

    def spawn(self, coro: asyncio.Future[None] | asyncio.Task[None] | object) -> None:
        """Run a fire-and-forget coroutine that must not be garbage-collected mid-flight."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        for task in list(self.background):
            with contextlib.suppress(BaseException):
                await task
        await self.presence.stop()
        await self.events.close()
        await self.providers.close()
        await self.engine.dispose()
        await self.redis_handle.close()


async def build_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    providers: Providers | None = None,
) -> Services:
    """Connect to Redis and the database and assemble the adapters."""
    clock = clock or SystemClock()
    handle = await connect(settings)
    keys = KeySpace.of(settings)
    engine = make_engine(settings)
    events = EventBus(handle.client)
    process_id = new_id()
    sessions = make_sessionmaker(engine)
    presence = Presence(handle.client, keys, process_id)
    jobs = JobQueue(handle.client, keys, clock)
    approvals = ApprovalStore(
        handle.client,
        keys,
        clock,
        jobs,
        Durability(settings.wait_replicas, settings.redis_wait_ms),
    )
    services = Services(
        settings=settings,
        clock=clock,
        redis_handle=handle,
        keys=keys,
        engine=engine,
        db=sessions,
        events=events,
        approvals=approvals,
        presence=presence,
        sessions=SessionStore(handle.client, keys, clock),
        limits=RateLimiter(handle.client, keys, clock),
        providers=providers if providers is not None else await build_providers(settings),
        process_id=process_id,
        api_keys=TtlCache(clock, ttl=API_KEY_CACHE_SECONDS, max_entries=1024),
        accounts=AccountCache(sessions, presence, clock),
        waiters=Waiters(events, approvals, keys, process_id),
        jobs=jobs,
        codes=OneTimeCodes(
            handle.client, keys, clock, KeyedHash(secret_key(settings), "one-time-codes")
        ),
        webauthn=WebAuthnChallenges(handle.client, keys),
    )
    return services
