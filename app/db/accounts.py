"""Users, passwords, enrollment codes and API keys: the queries the web app and the CLI share.

Functions take an open `AsyncSession` and never commit; the caller owns the transaction
(`async with sessionmaker.begin() as session: ...`). Times come in as Unix seconds from the
injected clock and are stored as naive UTC datetimes.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import Argon2Error
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import ColumnElement, bindparam, func, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import SystemClock, to_datetime
from app.core.enrollment import EnrollmentKind
from app.core.tokens import hash_token, new_id, new_token
from app.db.hashing import run_hashing
from app.db.models import ApiKey, Device, EnrollmentCode, User

MIN_PASSWORD_LENGTH = 8
# argon2 accepts any length; the cap only stops megabyte "passwords" used as a cheap DoS.
MAX_PASSWORD_LENGTH = 1024
MAX_EMAIL_LENGTH = 320
ENROLLMENT_CODE_TTL = 600
# 128 bits of randomness, above the 112 the protocol asks of enrollment codes.
ENROLLMENT_CODE_BYTES = 16
API_KEY_PREFIX = "tap_"
API_KEY_BYTES = 32
MAX_API_KEY_NAME = 100
IMPORT_FIELDS = frozenset({"email", "password", "password_hash", "verified", "phone"})

# argon2id with the library's defaults (RFC 9106 low-memory profile: t=3, m=64 MiB, p=4).
_hasher = PasswordHasher()


class AccountError(Exception):
    """A refusal the caller can show as is: `code` is stable, the message is for people."""

    code = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidAccountData(AccountError, ValueError):
    """A malformed email, phone number, password, password hash or name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DuplicateUser(AccountError):
    """A user with this email already exists."""

    code = "duplicate_user"

    def __init__(self, email: str) -> None:
        super().__init__(f"a user with email {email} already exists")
        self.email = email


class UnknownUser(AccountError, LookupError):
    """No user has this email."""

    code = "unknown_user"

    def __init__(self, email: str) -> None:
        super().__init__(f"no user with email {email}")
        self.email = email


class DuplicateApiKey(AccountError):
    """An API key with this name already exists."""

    code = "duplicate_api_key"

    def __init__(self, name: str) -> None:
        super().__init__(f"an API key named {name!r} already exists")
        self.name = name


class UnknownApiKey(AccountError, LookupError):
    """No live API key has this name."""

    code = "unknown_api_key"

    def __init__(self, name: str) -> None:
        super().__init__(f"no live API key named {name!r}")
        self.name = name


class UserImportError(InvalidAccountData):
    """One line of a user import file is wrong; nothing was imported."""

    code = "invalid_import"

    def __init__(self, line: int, message: str) -> None:
        super().__init__("file", f"line {line}: {message}")
        self.line = line


# --- validation ---------------------------------------------------------------------------


def normalize_email(email: str) -> str:
    """The canonical, lowercased form of an email address; InvalidAccountData if malformed.

    NFKC first, so compatibility spellings (full-width letters and @, ligatures) are the
    address they look like: one account, one guess budget, one registration.
    """
    if not isinstance(email, str):
        raise InvalidAccountData("email", "email must be a string")
    candidate = unicodedata.normalize("NFKC", email).strip()
    if not candidate or len(candidate) > MAX_EMAIL_LENGTH:
        raise InvalidAccountData("email", "email must be 1 to 320 characters")
    try:
        # No DNS lookups; reserved `.test` domains are accepted for test and staging setups.
        info = validate_email(candidate, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        raise InvalidAccountData("email", f"invalid email address: {exc}") from None
    normalized = info.normalized.lower()
    if len(normalized) > MAX_EMAIL_LENGTH:
        raise InvalidAccountData("email", "email must be 1 to 320 characters")
    return normalized


def normalize_phone(phone: str) -> str:
    """A phone number in E.164 form (`+14155552671`); InvalidAccountData unless it can be one."""
    message = "phone must be an international number in E.164 form, like +14155552671"
    if not isinstance(phone, str) or not phone.strip().startswith("+"):
        raise InvalidAccountData("phone", message)
    try:
        parsed = phonenumbers.parse(phone.strip(), None)
    except phonenumbers.NumberParseException:
        raise InvalidAccountData("phone", message) from None
    # "Possible" (right length for the country), not "valid": the bundled numbering metadata
    # lags behind new ranges, and a wrong number only costs an undelivered SMS.
    if not phonenumbers.is_possible_number(parsed):
        raise InvalidAccountData("phone", message)
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def validate_password(password: str) -> None:
    """Raise InvalidAccountData unless the password has 8 to 1024 characters."""
    if not isinstance(password, str):
        raise InvalidAccountData("password", "password must be a string")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidAccountData(
            "password",
            f"password must have {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
        )


def validate_password_hash(password_hash: str) -> str:
    """Return an imported argon2 hash unchanged, or raise InvalidAccountData if it is not one."""
    if (
        not isinstance(password_hash, str)
        or not password_hash.startswith("$argon2")
        or len(password_hash) > 255
    ):
        raise InvalidAccountData(
            "password_hash", "password_hash must be an argon2 hash ($argon2...)"
        )
    try:
        extract_parameters(password_hash)
    except (Argon2Error, ValueError):
        raise InvalidAccountData(
            "password_hash", "password_hash is not a well-formed argon2 hash"
        ) from None
    return password_hash


# --- passwords ----------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """An argon2id hash of the password (CPU- and memory-heavy: async code runs it with
    app.db.hashing.run_hashing)."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True if the password matches the argon2 hash; False for a mismatch or a broken hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (Argon2Error, ValueError, TypeError):
        # A mismatch (VerifyMismatchError is an Argon2Error) or a hash that cannot be read.
        return False


def needs_rehash(password_hash: str) -> bool:
    """True if the hash was made with other parameters than today's (re-hash after login)."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except (Argon2Error, ValueError, TypeError):
        return True


def _dummy_hash() -> str:
    # A hash of a random password nobody kept, made with today's default parameters. Stored
    # as text so every CLI start does not pay for an argon2 hash; recomputed if the library's
    # defaults ever change, so the work spent still equals a real user's.
    stored = (
        "$argon2id$v=19$m=65536,t=3,p=4$smdY/UCWp9+2UK3ticOH9Q"
        "$kPDofzNlocgne1H7C4PrMFvnro6RUTRbzVKkP0L8FKQ"
    )
    if needs_rehash(stored):
        return hash_password(new_token(16))
    return stored


# Verified against when the email is unknown, so unknown users cost the same time as known ones.
DUMMY_HASH = _dummy_hash()


async def check_password(user: User | None, password: str) -> bool:
    """Verify a login password off the event loop, spending the same work for unknown users."""
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
        password = ""
    stored = user.password_hash if user is not None else DUMMY_HASH
    matches = await run_hashing(verify_password, stored, password)
    return matches and user is not None


# --- users --------------------------------------------------------------------------------


async def create_user(
    session: AsyncSession,
    email: str,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    verified: bool = False,
    phone: str | None = None,
    phone_verified: bool = False,
    now: float,
) -> User:
    """Add a user with a password (hashed here) or an existing argon2 hash; DuplicateUser if taken.

    If a concurrent insert wins the race, the flush fails and the caller's transaction must be
    rolled back (leaving `async with sessionmaker.begin()` by the exception does that).
    """
    normalized = normalize_email(email)
    phone_e164 = normalize_phone(phone) if phone is not None else None
    stored_hash = await _stored_password_hash(password, password_hash)
    # Looked up after hashing, so a taken address costs the same time as a free one.
    if await get_user_by_email(session, normalized) is not None:
        raise DuplicateUser(normalized)
    user = _new_user(normalized, stored_hash, verified, phone_e164, phone_verified, now)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise DuplicateUser(normalized) from exc
    return user


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    """The user with this email (matched in canonical form), or None."""
    try:
        normalized = normalize_email(email)
    except InvalidAccountData:
        return None
    result = await session.exec(select(User).where(User.email == normalized))
    return result.first()


async def get_user(session: AsyncSession, user_id: str) -> User | None:
    """The user with this id, or None."""
    return await session.get(User, user_id)


# The one statement a phone connects with, built once (no per-call statement building and
# cache-key generation) and run on a bare connection, not an ORM session: 0.7 ms less CPU
# per connect (1.4 → 0.6 ms, bench/RESULTS.md).
_TOUCH_DEVICE = (
    update(Device)
    .where(col(Device.token_hash) == bindparam("hashed"), col(Device.revoked_at).is_(None))
    .values(last_seen_at=bindparam("seen"))
    .returning(
        col(Device.id),
        col(Device.user_id),
        col(Device.public_jwk),
        col(Device.passcode_confirmed_at),
    )
)


async def touch_device(
    engine: AsyncEngine, token_hash: str, *, now: float
) -> tuple[str, str, str, bool] | None:
    """Mark the live device holding this token seen now and return its (id, user_id,
    public_jwk, whether it has yet to confirm a passcode seed); None when no live device
    holds it. One statement in its own transaction (unlike this module's other functions,
    it commits): a phone connects with it."""
    async with engine.begin() as conn:
        result = await conn.execute(
            _TOUCH_DEVICE, {"hashed": token_hash, "seen": to_datetime(now)}
        )
        row = result.first()
    return (row[0], row[1], row[2], row[3] is None) if row is not None else None


async def list_active_devices(session: AsyncSession, user_id: str) -> list[Device]:
    """The user's enrolled, unrevoked devices."""
    result = await session.exec(
        select(Device).where(Device.user_id == user_id, Device.revoked_at == None)  # noqa: E711
    )
    return list(result.all())


async def active_devices(db: async_sessionmaker[AsyncSession], user_id: str) -> list[Device]:
    """The user's enrolled, unrevoked devices, read in a session of their own."""
    async with db() as session:
        return await list_active_devices(session, user_id)


async def revoke_all_devices(session: AsyncSession, user_id: str, *, now: float) -> list[Device]:
    """Revoke every live device of the user (an operator's reset); the ones revoked."""
    devices = await list_active_devices(session, user_id)
    for device in devices:
        device.revoked_at = to_datetime(now)
        device.push_token = None
        session.add(device)
    await session.flush()
    return devices


async def set_locked(
    session: AsyncSession, email: str, locked: bool, *, now: float | None = None
) -> User:
    """Lock or unlock a user's new approvals (a fraud report locks; an operator unlocks)."""
    user = await get_user_by_email(session, email)
    if user is None:
        raise UnknownUser(email.strip())
    user.locked = locked
    if locked:
        user.locked_at = to_datetime(now if now is not None else SystemClock().now())
    else:
        user.locked_at = None
    session.add(user)
    await session.flush()
    return user


def _new_user(
    email: str,
    password_hash: str,
    verified: bool,
    phone: str | None,
    phone_verified: bool,
    now: float,
) -> User:
    at = to_datetime(now)
    return User(
        id=new_id(),
        email=email,
        password_hash=password_hash,
        email_verified=verified,
        verified_at=at if verified else None,
        phone=phone,
        phone_verified=phone is not None and phone_verified,
        created_at=at,
    )


async def _stored_password_hash(password: str | None, password_hash: str | None) -> str:
    if (password is None) == (password_hash is None):
        raise InvalidAccountData("password", "give exactly one of password and password_hash")
    if password_hash is not None:
        return validate_password_hash(password_hash)
    assert password is not None
    validate_password(password)
    return await run_hashing(hash_password, password)


# --- enrollment codes ---------------------------------------------------------------------


async def create_enrollment_code(
    session: AsyncSession,
    user_id: str,
    now: float,
    ttl: int = ENROLLMENT_CODE_TTL,
    *,
    kind: EnrollmentKind = "operator",
    enrollments_seen: int | None = None,
) -> tuple[str, float]:
    """A new single-use code that enrolls one device for the user: (code, expires_at seconds).

    `kind` says who vouched for it (app.core.enrollment); the default is the operator's (the
    CLI). A recovery code needs `enrollments_seen`, the user's `device_enrollments` as read
    when the session was allowed to make it.
    """
    if kind == "recovery" and enrollments_seen is None:
        raise ValueError("a recovery code needs the user's device_enrollments")
    code = new_token(ENROLLMENT_CODE_BYTES)
    expires_at = now + ttl
    session.add(
        EnrollmentCode(
            code_hash=hash_token(code),
            user_id=user_id,
            kind=kind,
            enrollments_seen=enrollments_seen if kind == "recovery" else None,
            created_at=to_datetime(now),
            expires_at=to_datetime(expires_at),
        )
    )
    await session.flush()
    return code, expires_at


async def expire_enrollment_codes(session: AsyncSession, user_id: str, *, now: float) -> int:
    """End every live enrollment code of the user now (an operator's reset); how many."""
    at = to_datetime(now)
    result = await session.exec(
        update(EnrollmentCode)
        .where(
            col(EnrollmentCode.user_id) == user_id,
            col(EnrollmentCode.used_at).is_(None),
            col(EnrollmentCode.expires_at) > at,
        )
        .values(expires_at=at)
        .execution_options(synchronize_session=False)
    )
    count: int = result.rowcount
    return count


async def consume_enrollment_code(session: AsyncSession, code: str, now: float) -> str | None:
    """Use up an enrollment code and return its user id; None if unknown, used, expired, or
    no longer allowed (a first-device or recovery code after another device was enrolled).

    Two conditional UPDATEs in the caller's transaction. The first claims the code, so of two
    requests with one code exactly one wins. The second counts the enrollment on the user row,
    under the code's condition; two requests with two codes of one user queue on that row's
    lock (PostgreSQL re-checks the condition after the first commits; SQLite has one writer),
    so of two first-device codes used at once exactly one enrolls. On None the caller must not
    add a device (and need not commit: the code could never be used again anyway).
    """
    if not isinstance(code, str):
        return None
    code = code.strip()
    if not code or len(code) > 200:
        return None
    at = to_datetime(now)
    claim = (
        update(EnrollmentCode)
        .where(
            col(EnrollmentCode.code_hash) == hash_token(code),
            col(EnrollmentCode.used_at).is_(None),
            col(EnrollmentCode.expires_at) > at,
        )
        .values(used_at=at)
        .returning(
            col(EnrollmentCode.user_id),
            col(EnrollmentCode.kind),
            col(EnrollmentCode.enrollments_seen),
        )
    )
    claimed = (await session.exec(claim)).first()
    if claimed is None:
        return None
    user_id, kind, seen = claimed
    # The condition is on the user row itself, so checking and counting are one statement.
    condition: list[ColumnElement[bool]] = []
    if kind == "first_device":
        condition.append(col(User.second_factor_at).is_(None))
    elif kind == "recovery" and seen is not None:
        condition.append(col(User.device_enrollments) == seen)
    elif kind not in ("device", "passkey", "operator"):
        return None  # a kind this version does not know (or a malformed row) vouches for nothing
    counted = await session.exec(
        update(User)
        .where(col(User.id) == user_id, *condition)
        .values(
            device_enrollments=col(User.device_enrollments) + 1,
            second_factor_at=func.coalesce(col(User.second_factor_at), at),
        )
        # Plain UPDATE: rows already loaded in this session are not refreshed, and rowcount
        # stays the database's own count.
        .execution_options(synchronize_session=False)
    )
    if counted.rowcount != 1:
        return None
    found: str = user_id
    return found


# --- API keys -----------------------------------------------------------------------------


async def create_api_key(session: AsyncSession, name: str, now: float) -> tuple[ApiKey, str]:
    """A new relying-party key: the row, and the plaintext `tap_…` key (shown once, not stored)."""
    clean = name.strip() if isinstance(name, str) else ""
    if not clean or len(clean) > MAX_API_KEY_NAME:
        raise InvalidAccountData("name", f"name must be 1 to {MAX_API_KEY_NAME} characters")
    existing = await session.exec(select(ApiKey).where(ApiKey.name == clean))
    if existing.first() is not None:
        raise DuplicateApiKey(clean)
    plaintext = API_KEY_PREFIX + new_token(API_KEY_BYTES)
    key = ApiKey(
        id=new_id(), name=clean, key_hash=hash_token(plaintext), created_at=to_datetime(now)
    )
    session.add(key)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise DuplicateApiKey(clean) from exc
    return key, plaintext


async def revoke_api_key(session: AsyncSession, name: str, now: float) -> ApiKey:
    """Revoke the live key named `name`; serving processes stop accepting it within
    `app.services.API_KEY_CACHE_SECONDS`."""
    clean = name.strip() if isinstance(name, str) else ""
    result = await session.exec(
        select(ApiKey).where(ApiKey.name == clean, col(ApiKey.revoked_at).is_(None))
    )
    key = result.first()
    if key is None:
        raise UnknownApiKey(clean)
    key.revoked_at = to_datetime(now)
    session.add(key)
    await session.flush()
    return key


async def get_api_key_by_plaintext(session: AsyncSession, plaintext: str) -> ApiKey | None:
    """The live (not revoked) API key whose plaintext this is, or None."""
    if not isinstance(plaintext, str) or not plaintext.startswith(API_KEY_PREFIX):
        return None
    if len(plaintext) > 200:
        return None
    # Looking up by SHA-256 of a 256-bit secret leaks nothing through timing.
    result = await session.exec(
        select(ApiKey).where(
            ApiKey.key_hash == hash_token(plaintext), col(ApiKey.revoked_at).is_(None)
        )
    )
    return result.first()


# --- import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedUser:
    """One user created by `import_users`, with its enrollment code when asked for."""

    email: str
    user_id: str
    enroll_code: str | None = None
    enroll_expires_at: float | None = None


@dataclass(frozen=True)
class _ImportEntry:
    line: int
    email: str
    password: str | None
    password_hash: str | None
    verified: bool
    phone: str | None


async def import_users(
    session: AsyncSession,
    lines: Iterable[str],
    now: float,
    with_enroll_codes: bool = False,
) -> list[ImportedUser]:
    """Create users from JSON lines, all or nothing; UserImportError names the first bad line.

    Each line is `{"email","password"}` or `{"email","password_hash"}` (argon2) with optional
    `"verified"` (email) and `"phone"` (E.164, trusted as verified since the operator vouches
    for it). Blank lines are skipped. Every line is checked, against the file and the
    database, before anything is written; the caller commits.
    """
    entries: list[_ImportEntry] = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        entry = _parse_import_line(number, text)
        if entry.email in first_line:
            raise UserImportError(
                number, f"{entry.email} already appears on line {first_line[entry.email]}"
            )
        first_line[entry.email] = number
        entries.append(entry)

    taken = await _existing_emails(session, list(first_line))
    for entry in entries:
        if entry.email in taken:
            raise UserImportError(entry.line, f"a user with email {entry.email} already exists")

    users: list[User] = []
    for entry in entries:
        if entry.password_hash is not None:
            stored_hash = entry.password_hash
        else:
            stored_hash = await run_hashing(hash_password, entry.password or "")
        user = _new_user(entry.email, stored_hash, entry.verified, entry.phone, True, now)
        session.add(user)
        users.append(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        # Another writer registered one of these addresses after the check above.
        raise DuplicateUser("one of the imported addresses") from exc

    imported: list[ImportedUser] = []
    for user in users:
        if with_enroll_codes:
            code, expires_at = await create_enrollment_code(session, user.id, now)
            imported.append(ImportedUser(user.email, user.id, code, expires_at))
        else:
            imported.append(ImportedUser(user.email, user.id))
    return imported


def _parse_import_line(number: int, text: str) -> _ImportEntry:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserImportError(number, f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserImportError(number, "expected a JSON object")
    unknown = sorted(set(data) - IMPORT_FIELDS)
    if unknown:
        raise UserImportError(number, f"unknown field(s): {', '.join(unknown)}")
    email = data.get("email")
    password = data.get("password")
    password_hash = data.get("password_hash")
    verified = data.get("verified", False)
    phone = data.get("phone")
    try:
        if not isinstance(email, str):
            raise InvalidAccountData("email", "email is required")
        normalized = normalize_email(email)
        if (password is None) == (password_hash is None):
            raise InvalidAccountData("password", "give exactly one of password and password_hash")
        if password is not None:
            validate_password(password)
        if password_hash is not None:
            validate_password_hash(password_hash)
        if not isinstance(verified, bool):
            raise InvalidAccountData("verified", "verified must be true or false")
        phone_e164 = normalize_phone(phone) if phone is not None else None
    except InvalidAccountData as exc:
        raise UserImportError(number, exc.message) from None
    return _ImportEntry(number, normalized, password, password_hash, verified, phone_e164)


async def _existing_emails(session: AsyncSession, emails: list[str]) -> set[str]:
    found: set[str] = set()
    # Chunks keep the IN list under every driver's bound-parameter limit.
    for start in range(0, len(emails), 500):
        chunk = emails[start : start + 500]
        result = await session.exec(select(User.email).where(col(User.email).in_(chunk)))
        found.update(result.all())
    return found
