"""Who the benchmark's traffic belongs to: an API key, users, phones enrolled over HTTP, and
(for the idle-socket scenario only) devices inserted straight into the database.

The key and the users come from app.db.accounts (the functions behind `tapprove apikey
create` and `tapprove user import --enroll-codes`); every phone then enrolls through the
public API (`POST /api/devices`). Only the idle sockets' devices are bulk-inserted as `User`
and `Device` rows with SHA-256 token hashes, exactly what enrollment would have stored,
because enrolling tens of thousands over HTTP would take most of the run.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from argon2 import PasswordHasher

from bench import PASSWORD
from bench.jws import DeviceSigner, new_scalar, public_jwk


@dataclass
class Population:
    """What the load generator needs to act as relying party, browsers and phones."""

    api_key: str
    phones: list[dict[str, Any]]  # email, device_id, token, scalar (hex)
    login_users: list[str]  # users with no device: logins end at `enrollment_required`
    idle_seed: str = ""
    idle_count: int = 0
    # A Duo integration's keys (tapprove only): ikey, skey, host.
    duo: dict[str, str] | None = None


def phone_email(i: int) -> str:
    return f"phone-{i}@bench.test"


def login_email(i: int) -> str:
    return f"login-{i}@bench.test"


def password_hash() -> str:
    """The bench password hashed with app's argon2id parameters (the library defaults)."""
    return PasswordHasher().hash(PASSWORD)


async def _enroll(
    http: aiohttp.ClientSession, url: str, email: str, code: str, gate: asyncio.Semaphore
) -> dict[str, Any]:
    scalar = new_scalar()
    signer = DeviceSigner(scalar, "")
    body = {
        "code": code,
        "name": "bench phone",
        "platform": "android",
        "public_key": public_jwk(signer.key),
    }
    async with gate, http.post(url + "/api/devices", json=body) as response:
        data = await response.json()
        if response.status != 201:
            raise RuntimeError(f"enrolling {email} failed: {response.status} {data}")
    return {
        "email": email,
        "device_id": data["device_id"],
        "token": data["device_token"],
        "scalar": f"{scalar:x}",
    }


async def populate_tapprove(
    database_url: str, server_url: str, phones: int, login_users: int
) -> Population:
    """An API key and users with app.db.accounts (what `tapprove apikey create` and
    `tapprove user import --enroll-codes` run), then each phone enrolled over HTTP."""
    from app.db.accounts import create_api_key, import_users
    from app.db.engine import engine_from_url, make_sessionmaker

    hashed = password_hash()
    lines = [
        json.dumps({"email": phone_email(i), "password_hash": hashed, "verified": True})
        for i in range(phones)
    ] + [
        json.dumps({"email": login_email(i), "password_hash": hashed, "verified": True})
        for i in range(login_users)
    ]
    engine = engine_from_url(database_url, pooled=False)
    try:
        async with make_sessionmaker(engine).begin() as session:
            _, api_key = await create_api_key(session, "bench-rp", time.time())
            imported = await import_users(session, lines, time.time(), with_enroll_codes=True)
    finally:
        await engine.dispose()
    codes = {u.email: u.enroll_code for u in imported}
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as http:
        enrolled = await asyncio.gather(
            *(_enroll(http, server_url, phone_email(i), codes[phone_email(i)] or "", gate)
              for i in range(phones))
        )
    return Population(api_key, list(enrolled), [login_email(i) for i in range(login_users)])


def idle_token(seed: str, index: int) -> str:
    """The device token of idle device `index` (the holder process derives the same one)."""
    return f"{seed}.{index}"


async def insert_idle_devices(database_url: str, count: int, chunk: int = 5000) -> str:
    """Insert `count` users with one device each, straight into the tables; returns the seed."""
    from sqlalchemy import insert

    from app.core.tokens import hash_token
    from app.db.engine import engine_from_url
    from app.db.models import Device, User

    seed = secrets.token_hex(8)
    hashed = password_hash()
    jwk = json.dumps(public_jwk(DeviceSigner(new_scalar(), "").key), separators=(",", ":"))
    engine = engine_from_url(database_url, pooled=False)
    at = time.time()
    from app.core.clock import to_datetime

    created = to_datetime(at)
    try:
        for start in range(0, count, chunk):
            users, devices = [], []
            for i in range(start, min(count, start + chunk)):
                user_id = f"{seed}{i:016x}"
                users.append(
                    User(
                        id=user_id,
                        email=f"idle-{seed}-{i}@bench.test",
                        password_hash=hashed,
                        email_verified=True,
                        created_at=created,
                        verified_at=created,
                    ).model_dump()
                )
                devices.append(
                    Device(
                        id=f"{seed}{i:016x}",
                        user_id=user_id,
                        name="idle bench phone",
                        platform="android",
                        public_jwk=jwk,
                        token_hash=hash_token(idle_token(seed, i)),
                        created_at=created,
                        # As enrollment leaves it: its passcode seed confirmed, so a
                        # connect is not also a seed's delivery (one SQL write more).
                        passcode_confirmed_at=created,
                    ).model_dump()
                )
            async with engine.begin() as conn:
                await conn.execute(insert(User), users)
                await conn.execute(insert(Device), devices)
    finally:
        await engine.dispose()
    return seed


async def wait_outbox_drained(database_url: str, timeout: float = 60.0) -> int:
    """Wait until the worker has handled every queued mail (enrollment notices); returns left."""
    from sqlalchemy import func, select

    from app.db.engine import engine_from_url
    from app.db.models import OutboxMessage

    engine = engine_from_url(database_url, pooled=False)
    left = -1
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                left = int(
                    (
                        await conn.execute(
                            select(func.count())
                            .select_from(OutboxMessage)
                            .where(OutboxMessage.status.in_(("queued", "processing")))  # type: ignore[attr-defined]
                        )
                    ).scalar_one()
                )
            if left == 0:
                break
            await asyncio.sleep(0.25)
    finally:
        await engine.dispose()
    return left


def baseline_population(phones: int, login_users: int) -> Population:
    """The baseline has no accounts: a phone's token is its user's name."""
    return Population(
        api_key="none",
        phones=[
            {"email": phone_email(i), "device_id": f"b{i}", "token": phone_email(i),
             "scalar": f"{new_scalar():x}"}
            for i in range(phones)
        ],
        login_users=[login_email(i) for i in range(login_users)],
    )
