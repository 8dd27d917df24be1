"""Accounts on a real database: users, passwords, enrollment codes, imports, API keys, audit."""

from __future__ import annotations

import asyncio
import json

import pytest
from argon2 import PasswordHasher
from sqlmodel import func, select

from app.core.clock import to_datetime
from app.db import accounts, audit
from app.db.accounts import (
    DUMMY_HASH,
    DuplicateApiKey,
    DuplicateUser,
    InvalidAccountData,
    UnknownUser,
    UserImportError,
)
from app.db.models import ApiKey, AuditEvent, EnrollmentCode, User
from tests.fixtures.db import Sessions

NOW = 1_800_000_000.0
PASSWORD = "correct horse battery staple"


async def _user_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return (await session.exec(select(func.count()).select_from(User))).one()


async def _add_user(sessions: Sessions, email: str = "alice@example.com") -> User:
    async with sessions.begin() as session:
        return await accounts.create_user(session, email, password=PASSWORD, now=NOW)


# --- passwords ------------------------------------------------------------------------------


def test_a_password_verifies_against_its_own_hash_only() -> None:
    stored = accounts.hash_password(PASSWORD)

    assert stored.startswith("$argon2id$")
    assert accounts.verify_password(stored, PASSWORD)
    assert not accounts.verify_password(stored, PASSWORD + "!")


def test_verifying_against_a_broken_hash_is_false_not_an_error() -> None:
    assert not accounts.verify_password("not a hash", PASSWORD)
    assert not accounts.verify_password("$argon2id$v=19$m=1,t=1,p=1$AAAA$BBBB", PASSWORD)
    assert not accounts.verify_password("", "")


def test_hashes_made_with_weaker_parameters_need_a_rehash() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)

    assert accounts.needs_rehash(weak)
    assert not accounts.needs_rehash(accounts.hash_password(PASSWORD))
    assert accounts.needs_rehash("garbage")


def test_the_dummy_hash_costs_what_a_real_one_does() -> None:
    # Same parameters as today's real hashes, so unknown emails take as long as known ones.
    assert DUMMY_HASH.startswith("$argon2id$")
    assert not accounts.needs_rehash(DUMMY_HASH)


async def test_check_password_is_false_for_an_unknown_user_and_true_for_the_owner(
    db_sessions: Sessions,
) -> None:
    user = await _add_user(db_sessions)

    assert await accounts.check_password(user, PASSWORD)
    assert not await accounts.check_password(user, "wrong password")
    assert not await accounts.check_password(None, PASSWORD)


# --- users ----------------------------------------------------------------------------------


async def test_a_user_is_stored_with_a_canonical_email_and_an_argon2_hash(
    db_sessions: Sessions,
) -> None:
    async with db_sessions.begin() as session:
        created = await accounts.create_user(
            session,
            "  Alice@Example.COM ",
            password=PASSWORD,
            verified=True,
            phone="+1 (415) 555-2671",
            phone_verified=True,
            now=NOW,
        )

    async with db_sessions() as session:
        user = await accounts.get_user_by_email(session, "ALICE@example.com")
        assert user is not None
        assert user.id == created.id
        assert user.email == "alice@example.com"
        assert accounts.verify_password(user.password_hash, PASSWORD)
        assert user.email_verified and user.verified_at == to_datetime(NOW)
        assert user.phone == "+14155552671" and user.phone_verified
        assert user.created_at == to_datetime(NOW)
        assert await accounts.get_user(session, created.id) is not None
        assert await accounts.get_user(session, "0" * 32) is None
        assert await accounts.get_user_by_email(session, "not an email") is None


async def test_a_second_user_with_the_same_email_in_any_case_is_a_duplicate(
    db_sessions: Sessions,
) -> None:
    await _add_user(db_sessions, "alice@example.com")

    with pytest.raises(DuplicateUser):
        async with db_sessions.begin() as session:
            await accounts.create_user(session, "ALICE@example.com", password=PASSWORD, now=NOW)
    assert await _user_count(db_sessions) == 1


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "a@example.com"}, "password"),
        ({"email": "a@example.com", "password": PASSWORD, "password_hash": DUMMY_HASH}, "password"),
        (
            {"email": "a@example.com", "password_hash": "$2b$12$bcrypt.is.not.argon2"},
            "password_hash",
        ),
        ({"email": "a@example.com", "password_hash": "$argon2id$broken"}, "password_hash"),
        ({"email": "a@example.com", "password": PASSWORD, "phone": "4155552671"}, "phone"),
        ({"email": "a@example.com", "password": PASSWORD, "phone": "+1 12"}, "phone"),
    ],
)
async def test_malformed_user_data_is_refused_by_field(
    pg_sessions: Sessions, fields: dict[str, str], bad_field: str
) -> None:
    email = fields.pop("email")
    with pytest.raises(InvalidAccountData) as caught:
        async with pg_sessions.begin() as session:
            await accounts.create_user(session, email, now=NOW, **fields)  # type: ignore[arg-type]

    assert caught.value.field == bad_field
    assert await _user_count(pg_sessions) == 0


async def test_an_existing_argon2_hash_is_kept_as_is(db_sessions: Sessions) -> None:
    stored = accounts.hash_password(PASSWORD)
    async with db_sessions.begin() as session:
        user = await accounts.create_user(session, "b@example.com", password_hash=stored, now=NOW)

    assert user.password_hash == stored


async def test_locking_and_unlocking_a_user(db_sessions: Sessions) -> None:
    await _add_user(db_sessions)

    async with db_sessions.begin() as session:
        locked = await accounts.set_locked(session, "Alice@example.com", True, now=NOW)
    assert locked.locked and locked.locked_at == to_datetime(NOW)

    async with db_sessions.begin() as session:
        await accounts.set_locked(session, "alice@example.com", False)
    async with db_sessions() as session:
        user = await accounts.get_user_by_email(session, "alice@example.com")
        assert user is not None and not user.locked and user.locked_at is None

    with pytest.raises(UnknownUser):
        async with db_sessions.begin() as session:
            await accounts.set_locked(session, "nobody@example.com", False)


# --- enrollment codes -----------------------------------------------------------------------


async def test_an_enrollment_code_works_once(db_sessions: Sessions) -> None:
    user = await _add_user(db_sessions)
    async with db_sessions.begin() as session:
        code, expires_at = await accounts.create_enrollment_code(session, user.id, NOW)

    assert expires_at == NOW + 600
    assert len(code) >= 22  # 16 random bytes in base64url
    async with db_sessions.begin() as session:
        stored = await session.get(EnrollmentCode, code)
        assert stored is None  # only the hash is stored
        assert await accounts.consume_enrollment_code(session, code, NOW + 1) == user.id
    async with db_sessions.begin() as session:
        assert await accounts.consume_enrollment_code(session, code, NOW + 2) is None


async def test_an_expired_or_unknown_enrollment_code_is_refused(db_sessions: Sessions) -> None:
    user = await _add_user(db_sessions)
    async with db_sessions.begin() as session:
        code, expires_at = await accounts.create_enrollment_code(session, user.id, NOW, ttl=60)

    async with db_sessions.begin() as session:
        assert await accounts.consume_enrollment_code(session, code, expires_at) is None
        assert await accounts.consume_enrollment_code(session, "no-such-code", NOW) is None
        assert await accounts.consume_enrollment_code(session, "", NOW) is None
        assert await accounts.consume_enrollment_code(session, "x" * 5000, NOW) is None
    async with db_sessions.begin() as session:
        # Surrounding whitespace from a pasted code does not matter.
        assert await accounts.consume_enrollment_code(session, f" {code}\n", NOW + 59) == user.id


async def test_two_devices_racing_for_one_code_on_postgres_only_one_wins(
    pg_sessions: Sessions,
) -> None:
    user = await _add_user(pg_sessions)
    async with pg_sessions.begin() as session:
        code, _ = await accounts.create_enrollment_code(session, user.id, NOW)

    first = pg_sessions()
    await first.begin()
    assert await accounts.consume_enrollment_code(first, code, NOW + 1) == user.id

    async def second_consumer() -> str | None:
        async with pg_sessions.begin() as session:
            return await accounts.consume_enrollment_code(session, code, NOW + 1)

    # The second claim blocks on the first one's row lock and re-checks `used_at` after it.
    second = asyncio.create_task(second_consumer())
    await asyncio.sleep(0.3)
    assert not second.done()
    await first.commit()
    await first.close()

    assert await second is None


async def test_many_concurrent_claims_of_one_code_give_exactly_one_winner(
    db_sessions: Sessions,
) -> None:
    user = await _add_user(db_sessions)
    async with db_sessions.begin() as session:
        code, _ = await accounts.create_enrollment_code(session, user.id, NOW)

    async def claim() -> str | None:
        async with db_sessions.begin() as session:
            return await accounts.consume_enrollment_code(session, code, NOW + 1)

    results = await asyncio.gather(*(claim() for _ in range(8)))

    assert results.count(user.id) == 1
    assert results.count(None) == 7


# --- import ---------------------------------------------------------------------------------


def _lines(*entries: object) -> list[str]:
    return [e if isinstance(e, str) else json.dumps(e) for e in entries]


async def test_importing_users_creates_them_all_with_enrollment_codes(
    db_sessions: Sessions,
) -> None:
    imported_hash = accounts.hash_password("imported password")
    lines = _lines(
        {"email": "One@example.com", "password": PASSWORD},
        "",
        {"email": "two@example.com", "password_hash": imported_hash, "verified": True},
        {"email": "three@example.com", "password": PASSWORD, "phone": "+447911123456"},
    )

    async with db_sessions.begin() as session:
        imported = await accounts.import_users(session, lines, NOW, with_enroll_codes=True)

    assert [u.email for u in imported] == [
        "one@example.com",
        "two@example.com",
        "three@example.com",
    ]
    async with db_sessions.begin() as session:
        two = await accounts.get_user_by_email(session, "two@example.com")
        three = await accounts.get_user_by_email(session, "three@example.com")
        assert two is not None and two.password_hash == imported_hash and two.email_verified
        assert three is not None and three.phone == "+447911123456" and three.phone_verified
        for item in imported:
            assert item.enroll_code is not None
            assert item.enroll_expires_at == NOW + 600
            assert await accounts.consume_enrollment_code(session, item.enroll_code, NOW) == (
                item.user_id
            )


async def test_importing_without_codes_returns_none_for_them(db_sessions: Sessions) -> None:
    async with db_sessions.begin() as session:
        imported = await accounts.import_users(
            session, _lines({"email": "a@example.com", "password": PASSWORD}), NOW
        )

    assert imported[0].enroll_code is None


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"email": "c@example.com", "pasword": PASSWORD}, "unknown field"),
        ({"email": "c@example.com", "password": "short"}, "password"),
        ({"email": "c@example.com", "password_hash": "$2b$12$abc"}, "argon2"),
        ({"email": "c@example.com", "password": PASSWORD, "verified": "yes"}, "verified"),
        ({"email": "c@example.com", "password": PASSWORD, "phone": "555"}, "E.164"),
        ({"email": "A@example.com", "password": PASSWORD}, "already appears on line 1"),
        ({"password": PASSWORD}, "email"),
    ],
)
async def test_one_bad_line_imports_nothing_and_names_the_line(
    pg_sessions: Sessions, bad_line: object, message: str
) -> None:
    lines = _lines(
        {"email": "a@example.com", "password": PASSWORD},
        {"email": "b@example.com", "password": PASSWORD},
        bad_line,
    )

    with pytest.raises(UserImportError) as caught:
        async with pg_sessions.begin() as session:
            await accounts.import_users(session, lines, NOW, with_enroll_codes=True)

    assert caught.value.line == 3
    assert str(caught.value).startswith("line 3: ")
    assert message in str(caught.value)
    assert await _user_count(pg_sessions) == 0


async def test_importing_an_address_that_is_already_registered_imports_nothing(
    db_sessions: Sessions,
) -> None:
    await _add_user(db_sessions, "taken@example.com")
    lines = _lines(
        {"email": "new@example.com", "password": PASSWORD},
        {"email": "TAKEN@example.com", "password": PASSWORD},
    )

    with pytest.raises(UserImportError, match=r"line 2: .*already exists"):
        async with db_sessions.begin() as session:
            await accounts.import_users(session, lines, NOW)

    assert await _user_count(db_sessions) == 1


# --- API keys -------------------------------------------------------------------------------


async def test_an_api_key_is_found_by_its_plaintext_only(db_sessions: Sessions) -> None:
    async with db_sessions.begin() as session:
        key, plaintext = await accounts.create_api_key(session, " shop ", NOW)

    assert plaintext.startswith("tap_") and len(plaintext) >= 4 + 43
    assert key.name == "shop"
    async with db_sessions() as session:
        found = await accounts.get_api_key_by_plaintext(session, plaintext)
        assert found is not None and found.id == key.id
        assert await accounts.get_api_key_by_plaintext(session, plaintext + "x") is None
        assert await accounts.get_api_key_by_plaintext(session, plaintext[4:]) is None
        assert await accounts.get_api_key_by_plaintext(session, key.key_hash) is None
        stored = await session.get(ApiKey, key.id)
        assert stored is not None and plaintext not in stored.key_hash


async def test_a_revoked_api_key_no_longer_works(db_sessions: Sessions) -> None:
    async with db_sessions.begin() as session:
        key, plaintext = await accounts.create_api_key(session, "shop", NOW)
        key.revoked_at = to_datetime(NOW + 5)
        session.add(key)

    async with db_sessions() as session:
        assert await accounts.get_api_key_by_plaintext(session, plaintext) is None


async def test_api_key_names_are_unique(db_sessions: Sessions) -> None:
    async with db_sessions.begin() as session:
        await accounts.create_api_key(session, "shop", NOW)

    with pytest.raises(DuplicateApiKey):
        async with db_sessions.begin() as session:
            await accounts.create_api_key(session, "shop", NOW)
    with pytest.raises(InvalidAccountData):
        async with db_sessions.begin() as session:
            await accounts.create_api_key(session, "   ", NOW)


# --- audit ----------------------------------------------------------------------------------


async def test_audit_events_never_store_secrets(db_sessions: Sessions) -> None:
    user = await _add_user(db_sessions)
    async with db_sessions.begin() as session:
        await audit.record(
            session,
            "device.enrolled",
            user_id=user.id,
            ip="203.0.113.9",
            device_id="d" * 32,
            detail={"name": "Pixel", "code": "secret-code", "push": {"token": "fcm-token"}},
            now=NOW,
        )

    async with db_sessions() as session:
        row = (await session.exec(select(AuditEvent))).one()
    assert "secret-code" not in row.detail and "fcm-token" not in row.detail
    assert json.loads(row.detail) == {
        "code": "[redacted]",
        "name": "Pixel",
        "push": {"token": "[redacted]"},
    }


async def test_recent_audit_events_come_newest_first(db_sessions: Sessions) -> None:
    user = await _add_user(db_sessions)
    other = await _add_user(db_sessions, "bob@example.com")
    async with db_sessions.begin() as session:
        for i in range(5):
            await audit.record(session, f"event.{i}", user_id=user.id, now=NOW + i)
        await audit.record(session, "other.user", user_id=other.id, now=NOW + 10)

    async with db_sessions() as session:
        events = await audit.recent(session, user.id, limit=3)

    assert [e.kind for e in events] == ["event.4", "event.3", "event.2"]
    shown = audit.event_json(events[0])
    assert shown["at"] == "2027-01-15T08:00:04Z"
    assert shown["kind"] == "event.4" and shown["detail"] == {}
