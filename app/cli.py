"""The `tapprove` command: run the server or worker, migrate, and manage users, devices, keys.

With `--json` (before or after the subcommand) a command prints exactly one JSON object on
stdout and nothing else; logs and messages go to stderr. A failure exits non-zero with the
message on stderr and, with `--json`, `{"error","message"}` on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import typer
from sqlalchemy import make_url
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import SystemClock, rfc3339
from app.core.enrollment import enrollment_uri
from app.db import accounts, migrate
from app.db.audit import event_json
from app.db.engine import make_engine, make_sessionmaker
from app.db.models import AuditEvent, OutboxMessage, User
from app.settings import Settings, with_recorded_public_url

T = TypeVar("T")

# The argument that means "read it from standard input" (passwords, import files).
STDIN = "-"

JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON object on stdout (logs go to stderr)."),
]


@dataclass(frozen=True)
class Result:
    """What a command prints: `payload` with --json, `text` otherwise."""

    payload: dict[str, Any]
    text: str


@dataclass
class CliFailure(Exception):
    """A failure to report as `{"error": code, "message": message}` with a non-zero exit."""

    code: str
    message: str
    exit_code: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


# Plain help (rich_markup_mode=None): typer's rich help panel shows a type for every option,
# flags included (`--json <bool>`, even `--help <bool>`); the plain one shows none for flags.
app = typer.Typer(
    name="tapprove",
    help="tapprove: self-hosted push login approval (push MFA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _command_group(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=None)


db_app = _command_group("Database schema (Alembic migrations).")
user_app = _command_group("Users: add, unlock, import, reset-phones, recovery-codes.")
device_app = _command_group("Devices: enrollment codes.")
apikey_app = _command_group("Relying-party API keys.")
integration_app = _command_group("Duo Auth API integrations (pam_duo, login_duo, duo_client).")
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(device_app, name="device")
app.add_typer(apikey_app, name="apikey")
app.add_typer(integration_app, name="integration")


# `--json` is accepted on the root, on every group and on every command, so it may stand
# anywhere on the line; main() reads it once from the arguments.
class VersionRequested(Exception):
    """`--version` was given: main() prints the version as the command's result."""


def _version_option(value: bool) -> None:
    if value:
        raise VersionRequested


def package_version() -> str:
    """The installed tapprove package's version."""
    return importlib.metadata.version("tapprove")


@app.callback()
def _root(
    json_output: JsonFlag = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_version_option,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """tapprove: self-hosted push login approval (push MFA)."""


@db_app.callback()
def _db(json_output: JsonFlag = False) -> None:
    """Database schema (Alembic migrations)."""


@user_app.callback()
def _user(json_output: JsonFlag = False) -> None:
    """Users: add, unlock, import, reset-phones, recovery-codes."""


@device_app.callback()
def _device(json_output: JsonFlag = False) -> None:
    """Devices: enrollment codes."""


@apikey_app.callback()
def _apikey(json_output: JsonFlag = False) -> None:
    """Relying-party API keys."""


@integration_app.callback()
def _integration(json_output: JsonFlag = False) -> None:
    """Duo Auth API integrations (pam_duo, login_duo, duo_client)."""


# --- plumbing -----------------------------------------------------------------------------


def load_settings(*, recorded_public_url: bool = True) -> Settings:
    """Settings from the TAPPROVE_* environment, or a CliFailure naming the bad variable.

    Without TAPPROVE_PUBLIC_URL the public URL is the one `tapprove serve` recorded in the
    data dir, so that printed links point at the running server (`serve` finds its own).
    """
    try:
        settings = Settings()
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            # A rule across settings (no `loc`) names its variables in its message.
            (f"TAPPROVE_{'_'.join(str(p) for p in err['loc']).upper()}: " if err["loc"] else "")
            + err["msg"]
            for err in exc.errors()
        )
        raise CliFailure("invalid_settings", f"invalid settings: {problems}") from None
    return with_recorded_public_url(settings) if recorded_public_url else settings


def require_database(settings: Settings) -> None:
    """Refuse to go on without the embedded database: run outside the directory where
    `tapprove serve` runs, a command would otherwise create an empty one and work on that."""
    path = settings.embedded_database
    if path is not None and not path.exists():
        raise CliFailure(
            "no_database",
            f"no tapprove database at {path}. Run this command in the directory where "
            "`tapprove serve` runs (the data dir defaults to ./var of the current directory), "
            "or set TAPPROVE_DATA_DIR to that server's data dir; `tapprove db upgrade` "
            "creates a new database.",
        )


@contextlib.contextmanager
def _new_database_only_on_success(settings: Settings) -> Iterator[None]:
    """For a command that may start the embedded database (it adds what it is asked to):
    say so on stderr when it does, and remove what it created if the command fails."""
    path = settings.embedded_database
    if path is None or path.exists():
        yield
        return
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for file in path.parent.glob(f"{path.name}*"):  # the database, its WAL, its lock
            file.unlink(missing_ok=True)
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    sys.stderr.write(
        f"note: created a new database at {path} (no `tapprove serve` has used this data "
        "dir yet; set TAPPROVE_DATA_DIR if the server keeps its data elsewhere)\n"
    )


def _quiet_logging(settings: Settings) -> None:
    from app.logs import configure_logging

    configure_logging(settings)
    # Data commands report through their result; only warnings are worth a log line.
    logging.getLogger().setLevel(logging.WARNING)


def _run_with_session(
    settings: Settings, work: Callable[[AsyncSession], Awaitable[T]], *, may_create: bool = False
) -> T:
    """Migrate to head, then run `work` in one transaction (committed if it returns).

    Only with `may_create` does a missing embedded database get created (see
    require_database and _new_database_only_on_success).
    """
    if not may_create:
        require_database(settings)

    async def run() -> T:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    with _new_database_only_on_success(settings) if may_create else contextlib.nullcontext():
        migrate.upgrade(settings)
        return asyncio.run(run())


def _now() -> float:
    return SystemClock().now()


async def reset_push_fatigue(settings: Settings, user_id: str) -> None:
    """After an operator unlock: clear the user's push-fatigue backoff in Redis, and tell
    the running servers that the account changed (they cache `locked`)."""
    from app.approval.store import ApprovalStore
    from app.store.jobs import JobQueue
    from app.store.presence import account_changed
    from app.store.redis import KeySpace, connect

    handle = await connect(settings)
    keys = KeySpace.of(settings)
    clock = SystemClock()
    try:
        store = ApprovalStore(handle.client, keys, clock, JobQueue(handle.client, keys, clock))
        await store.clear_fatigue(user_id)
        await account_changed(handle.client, keys, user_id)
    finally:
        await handle.close()


async def _file_pending_audit_lines(settings: Settings) -> None:
    """Approval audit lines still on their way through Redis go to SQL first, so a listing
    is complete even when no worker runs."""
    from app.audit_trail import drain
    from app.store.redis import KeySpace, connect

    handle = await connect(settings)
    engine = make_engine(settings)
    try:
        await drain(handle.client, KeySpace.of(settings), make_sessionmaker(engine))
    finally:
        await engine.dispose()
        await handle.close()


# --- serve / worker / db ------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(metavar="HOST", help="Interface to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="PORT", help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Web server processes.")] = 1,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Do not run the broker consumers in-process.")
    ] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Serve HTTPS with this PEM certificate chain (TAPPROVE_TLS_CERT)."
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="The PEM private key of --tls-cert (TAPPROVE_TLS_KEY)."
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Run the web server (and, unless --no-worker, the broker consumers in-process).

    With --tls-cert and --tls-key (or their settings) it speaks HTTPS itself. Migrates the
    database schema to the latest version first. Without TAPPROVE_PUBLIC_URL, links use the
    address it listens on (127.0.0.1 for 0.0.0.0), recorded in the data dir for the other
    commands.
    """
    settings = load_settings(recorded_public_url=False)
    if tls_cert is not None or tls_key is not None:
        given = {"tls_cert": tls_cert or settings.tls_cert, "tls_key": tls_key or settings.tls_key}
        settings = settings.model_copy(update=given)
    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            raise CliFailure("invalid_settings", f"TLS file not found: {path}")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise CliFailure("invalid_settings", "TLS needs both a certificate and its key")
    migrate.upgrade(settings)
    from app.server import run_server

    run_server(settings, host=host, port=port, workers=workers, with_worker=not no_worker)


@app.command()
def worker(json_output: JsonFlag = False) -> None:
    """Run the broker consumers only: outbox, push retries, events.

    Migrates the database schema to the latest version first. With the embedded default it
    works on the database of a `tapprove serve` in the same data dir, and refuses to start
    without one.
    """
    settings = load_settings()
    require_database(settings)
    migrate.upgrade(settings)
    from app.worker import run_worker_forever

    run_worker_forever(settings)


@db_app.command("upgrade")
def db_upgrade(json_output: JsonFlag = False) -> Result:
    """Migrate the database schema to the latest version (Alembic head)."""
    settings = load_settings()
    migrate.upgrade(settings)
    revision = migrate.head_revision()
    where = make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)
    return Result({"revision": revision}, f"Database {where} is at revision {revision} (head).")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[
        str, typer.Argument(metavar="REVISION", help="Target revision; `base` drops everything.")
    ],
    json_output: JsonFlag = False,
) -> Result:
    """Migrate the database schema down to REVISION (for development and tests)."""
    settings = load_settings()
    require_database(settings)
    migrate.downgrade(settings, revision)
    return Result({"revision": revision}, f"Database downgraded to {revision}.")


# --- users --------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    email: Annotated[str, typer.Argument(metavar="EMAIL", help="The user's email address.")],
    password: Annotated[
        str,
        typer.Option(
            metavar="PASSWORD", help="Password (8+ characters); `-` reads one line from stdin."
        ),
    ],
    verified: Annotated[bool, typer.Option("--verified", help="Mark the email verified.")] = False,
    phone: Annotated[
        str | None,
        typer.Option(metavar="+E164", help="Phone for SMS fallback, E.164 (+14155552671)."),
    ] = None,
    json_output: JsonFlag = False,
) -> Result:
    """Add a user. A phone given here counts as verified.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)
    if password == STDIN:
        password = sys.stdin.readline().rstrip("\r\n")

    async def work(session: AsyncSession) -> Result:
        user = await accounts.create_user(
            session,
            email,
            password=password,
            verified=verified,
            phone=phone,
            phone_verified=phone is not None,
            now=_now(),
        )
        return Result(
            {"user_id": user.id, "email": user.email}, f"Added user {user.email} ({user.id})."
        )

    return _run_with_session(settings, work, may_create=True)


@user_app.command("unlock")
def user_unlock(
    email: Annotated[str, typer.Argument(metavar="EMAIL", help="The user's email address.")],
    json_output: JsonFlag = False,
) -> Result:
    """Unlock a user locked by a fraud report, so logins can ask for approval again.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> tuple[str, str]:
        user = await accounts.set_locked(session, email, False, now=_now())
        return user.id, user.email

    user_id, normalized = _run_with_session(settings, work)
    asyncio.run(reset_push_fatigue(settings, user_id))
    return Result({"email": normalized, "locked": False}, f"Unlocked {normalized}.")


@user_app.command("import")
def user_import(
    file: Annotated[str, typer.Argument(help="JSON lines file (`-` for stdin).", metavar="FILE")],
    enroll_codes: Annotated[
        bool, typer.Option("--enroll-codes", help="Also create an enrollment code per user.")
    ] = False,
    json_output: JsonFlag = False,
) -> Result:
    """Import users from JSON lines, all or nothing.

    Each line: {"email","password"} or {"email","password_hash"} (argon2), with optional
    "verified" (bool) and "phone" (E.164, counts as verified). A bad line names its number and
    nothing is imported. Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)
    lines = _read_lines(file)

    async def work(session: AsyncSession) -> list[accounts.ImportedUser]:
        return await accounts.import_users(session, lines, _now(), enroll_codes)

    imported = _run_with_session(settings, work, may_create=True)
    users: list[dict[str, Any]] = []
    text_lines = [f"Imported {len(imported)} user(s)."]
    for item in imported:
        entry: dict[str, Any] = {"email": item.email, "user_id": item.user_id}
        line = f"  {item.email} ({item.user_id})"
        if item.enroll_code is not None:
            entry["enroll_code"] = item.enroll_code
            line += f"  enroll code {item.enroll_code}"
        users.append(entry)
        text_lines.append(line)
    return Result({"users": users}, "\n".join(text_lines))


def _read_lines(file: str) -> list[str]:
    if file == STDIN:
        return sys.stdin.read().splitlines()
    try:
        # utf-8-sig: files saved by spreadsheet tools often start with a byte-order mark.
        return Path(file).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliFailure("invalid_request", f"cannot read {file}: {exc}") from None


@user_app.command("reset-phones")
def user_reset_phones(
    email: Annotated[str, typer.Argument(metavar="EMAIL", help="The user's email address.")],
    json_output: JsonFlag = False,
) -> Result:
    """For someone who lost every phone: revoke the user's devices, enrollment codes and
    sessions, and print a one-time link that enrolls one new device without signing in.

    You vouch for the person: hand the link (valid 10 minutes) only to them, after checking
    who they are. The owner is told by email. Migrates the database schema first.
    """
    from app.db import audit
    from app.delivery import notices

    settings = load_settings()
    _quiet_logging(settings)
    now = _now()

    async def work(session: AsyncSession) -> tuple[str, str, list[str], str, float]:
        user = await accounts.get_user_by_email(session, email)
        if user is None:
            raise accounts.UnknownUser(email.strip())
        revoked = await accounts.revoke_all_devices(session, user.id, now=now)
        # A code made before the reset (by a session a lost phone approved) dies with it.
        await accounts.expire_enrollment_codes(session, user.id, now=now)
        for device in revoked:
            await audit.record(
                session,
                "device.revoked",
                user_id=user.id,
                device_id=device.id,
                detail={"by": "operator"},
                now=now,
            )
        code, expires_at = await accounts.create_enrollment_code(
            session, user.id, now, kind="operator"
        )
        await audit.record(
            session,
            "device.enrollment_started",
            user_id=user.id,
            detail={"kind": "operator", "reset": True, "revoked_devices": len(revoked)},
            now=now,
        )
        # Queued here, sent by the dispatcher of a running server or worker.
        notices.account_recovery(
            settings, session, user, method="operator", revoked_devices=len(revoked), now=now
        )
        return user.id, user.email, [d.id for d in revoked], code, expires_at

    user_id, normalized, revoked, code, expires_at = _run_with_session(settings, work)
    asyncio.run(_forget_devices_and_sessions(settings, user_id, revoked))
    uri = enrollment_uri(settings.public_url, code)
    expires = rfc3339(expires_at)
    return Result(
        {"email": normalized, "code": code, "uri": uri, "expires_at": expires},
        f"Revoked {len(revoked)} device(s) of {normalized} and ended their sessions.\n"
        f"Enrollment code: {code}\nLink: {uri}\nExpires: {expires}",
    )


@user_app.command("recovery-codes")
def user_recovery_codes(
    email: Annotated[str, typer.Argument(metavar="EMAIL", help="The user's email address.")],
    json_output: JsonFlag = False,
) -> Result:
    """Issue a new set of 10 single-use recovery codes for the user, printed only now.

    The user's old codes stop working. Each code signs in once after the password, without
    the phone (a way back after losing it). Hand them only to the person, after checking who
    they are. Migrates the database schema first.
    """
    from app import recovery
    from app.db import audit

    settings = load_settings()
    _quiet_logging(settings)
    now = _now()

    async def work(session: AsyncSession) -> tuple[str, list[str]]:
        user = await accounts.get_user_by_email(session, email)
        if user is None:
            raise accounts.UnknownUser(email.strip())
        codes = await recovery.issue(session, user.id, now=now)
        await audit.record(
            session,
            "recovery_codes.created",
            user_id=user.id,
            detail={"by": "operator", "count": len(codes)},
            now=now,
        )
        return user.email, codes

    normalized, codes = _run_with_session(settings, work)
    created = rfc3339(now)
    return Result(
        {"email": normalized, "codes": codes, "created_at": created},
        f"Recovery codes for {normalized} (each works once; the old ones no longer do):\n"
        + "\n".join(f"  {code}" for code in codes),
    )


async def _forget_devices_and_sessions(
    settings: Settings, user_id: str, device_ids: list[str]
) -> None:
    """After a reset: close the revoked devices' sockets, end the user's sessions, and tell
    the running servers that the account changed."""
    from app.store.events import EventBus
    from app.store.presence import account_changed
    from app.store.redis import KeySpace, connect
    from app.store.sessions import SessionStore

    handle = await connect(settings)
    keys = KeySpace.of(settings)
    events = EventBus(handle.client)
    try:
        await account_changed(handle.client, keys, user_id)
        for device_id in device_ids:
            await events.publish(
                keys.user_channel(user_id), {"type": "device_revoked", "device_id": device_id}
            )
        await SessionStore(handle.client, keys, SystemClock()).revoke_user(user_id)
    finally:
        await events.close()
        await handle.close()


# --- devices, API keys, outbox ------------------------------------------------------------


@device_app.command("enroll-code")
def device_enroll_code(
    email: Annotated[str, typer.Argument(metavar="EMAIL", help="The user's email address.")],
    json_output: JsonFlag = False,
) -> Result:
    """Create a single-use code (valid 10 minutes) that enrolls one device for the user.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> tuple[str, float]:
        user = await accounts.get_user_by_email(session, email)
        if user is None:
            raise accounts.UnknownUser(email.strip())
        return await accounts.create_enrollment_code(session, user.id, _now())

    code, expires_at = _run_with_session(settings, work)
    uri = enrollment_uri(settings.public_url, code)
    expires = rfc3339(expires_at)
    return Result(
        {"code": code, "uri": uri, "expires_at": expires},
        f"Enrollment code: {code}\nLink: {uri}\nExpires: {expires}",
    )


@apikey_app.command("create")
def apikey_create(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="A unique name for the relying party.")
    ],
    json_output: JsonFlag = False,
) -> Result:
    """Create a relying-party API key; it is printed once and stored only as a hash.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> tuple[str, str]:
        key, plaintext = await accounts.create_api_key(session, name, _now())
        return key.name, plaintext

    key_name, plaintext = _run_with_session(settings, work, may_create=True)
    return Result(
        {"name": key_name, "api_key": plaintext},
        f"API key {key_name!r}: {plaintext}\nStore it now; it cannot be shown again.",
    )


@apikey_app.command("revoke")
def apikey_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The name the key was created with.")],
    json_output: JsonFlag = False,
) -> Result:
    """Revoke a relying-party API key; running servers refuse it within 10 seconds.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> str:
        key = await accounts.revoke_api_key(session, name, _now())
        return key.name

    key_name = _run_with_session(settings, work)
    return Result({"name": key_name, "revoked": True}, f"API key {key_name!r} revoked.")


@integration_app.command("create")
def integration_create(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="A unique name; the phone shows it.")
    ],
    match_mode: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="confirm (approve on the phone alone; Duo clients cannot show a number) "
            "or typed / choices / nist (the client shows the number in its status messages)."
        ),
    ] = "confirm",
    username_domain: Annotated[
        str | None,
        typer.Option(
            metavar="DOMAIN",
            help="Append @DOMAIN to Duo usernames without one (alice -> alice@DOMAIN).",
        ),
    ] = None,
    allow_enroll: Annotated[
        bool,
        typer.Option(
            "--allow-enroll",
            help="Let it call enroll / enroll_status: an enrollment link for the first "
            "device of a user who never had one (never for an account that has or had one).",
        ),
    ] = False,
    json_output: JsonFlag = False,
) -> Result:
    """Create a Duo Auth API integration: prints its ikey, its skey (shown once, stored
    sealed with the server's secret key) and the API host to configure in the client.

    Migrates the database schema to the latest version first.
    """
    from app.duo.integrations import SEAL_PURPOSE, api_host, create_integration
    from app.server_keys import SecretBox, secret_key

    settings = load_settings()
    _quiet_logging(settings)
    box = SecretBox(secret_key(settings), SEAL_PURPOSE)

    async def work(session: AsyncSession) -> tuple[str, str, str]:
        row, skey = await create_integration(
            session,
            box,
            name,
            match_mode=match_mode,
            username_domain=username_domain,
            allow_enroll=allow_enroll,
            now=_now(),
        )
        return row.name, row.ikey, skey

    created, ikey, skey = _run_with_session(settings, work)
    host = api_host(settings.public_url)
    text = (
        f"Integration {created!r}\n  ikey: {ikey}\n  skey: {skey}\n  host: {host}\n"
        "Store the skey now; it cannot be shown again."
    )
    if not settings.public_url.startswith("https://"):
        text += (
            "\nDuo clients speak HTTPS only: serve with --tls-cert/--tls-key or behind a TLS "
            "proxy, and set TAPPROVE_PUBLIC_URL to the https:// address they use."
        )
    return Result({"name": created, "ikey": ikey, "skey": skey, "api_host": host}, text)


@integration_app.command("list")
def integration_list(json_output: JsonFlag = False) -> Result:
    """List Duo integrations (revoked ones too), oldest first; never their skeys.

    Migrates the database schema to the latest version first.
    """
    from app.duo.integrations import list_integrations

    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        return [
            {
                "name": row.name,
                "ikey": row.ikey,
                "match_mode": row.match_mode,
                "username_domain": row.username_domain,
                "allow_enroll": row.allow_enroll,
                "created_at": rfc3339(row.created_at),
                "revoked_at": rfc3339(row.revoked_at) if row.revoked_at else None,
            }
            for row in await list_integrations(session)
        ]

    rows = _run_with_session(settings, work)
    text = "\n".join(
        f"{r['name']}  {r['ikey']}  match={r['match_mode']}"
        + (f"  domain={r['username_domain']}" if r["username_domain"] else "")
        + ("  enroll" if r["allow_enroll"] else "")
        + ("  REVOKED" if r["revoked_at"] else "")
        for r in rows
    )
    return Result({"integrations": rows}, text or "No integrations.")


@integration_app.command("revoke")
def integration_revoke(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The name the integration was created with.")
    ],
    json_output: JsonFlag = False,
) -> Result:
    """Revoke a Duo integration; running servers refuse its signatures within 10 seconds.

    Migrates the database schema to the latest version first.
    """
    from app.duo.integrations import revoke_integration

    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> str:
        return (await revoke_integration(session, name, _now())).name

    revoked = _run_with_session(settings, work)
    return Result({"name": revoked, "revoked": True}, f"Integration {revoked!r} revoked.")


@app.command()
def outbox(
    status: Annotated[
        str | None,
        typer.Option(
            metavar="STATUS", help="Only messages in this status (queued, sent, dead, ...)."
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10000, metavar="N", help="At most this many.")
    ] = 100,
    json_output: JsonFlag = False,
) -> Result:
    """List outgoing messages (mail, SMS), newest first, with status, attempts and last error.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> list[OutboxMessage]:
        query = select(OutboxMessage)
        if status is not None:
            query = query.where(OutboxMessage.status == status)
        query = query.order_by(col(OutboxMessage.created_at).desc()).limit(limit)
        return list((await session.exec(query)).all())

    rows = _run_with_session(settings, work)
    messages = [
        {
            "id": m.id,
            "channel": m.channel,
            "status": m.status,
            "attempts": m.attempts,
            "last_error": m.last_error,
        }
        for m in rows
    ]
    text = "\n".join(
        f"{m.id}  {m.channel:<5}  {m.status:<8}  attempts={m.attempts}"
        + (f"  last_error={m.last_error}" if m.last_error else "")
        for m in rows
    )
    return Result({"messages": messages}, text or "No messages.")


@app.command("audit")
def audit_events(
    user: Annotated[
        str | None, typer.Option(metavar="EMAIL", help="Only this user's events (email).")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(metavar="KIND", help="Only events of this kind (login.failed, ...)."),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10000, metavar="N", help="At most this many.")
    ] = 100,
    json_output: JsonFlag = False,
) -> Result:
    """List audit events, newest first: sign-ins, approvals, decisions, delivery attempts,
    device and settings changes, with time, IP and device.

    Migrates the database schema to the latest version first.
    """
    settings = load_settings()
    _quiet_logging(settings)

    async def find_user(session: AsyncSession) -> str | None:
        if user is None:
            return None
        found = await accounts.get_user_by_email(session, user)
        if found is None:
            raise accounts.UnknownUser(user.strip())
        return found.id

    # An unknown --user fails before the audit lines waiting in Redis are filed.
    user_id = _run_with_session(settings, find_user)

    async def work(session: AsyncSession) -> list[tuple[AuditEvent, str | None]]:
        query = select(AuditEvent, User.email).join(
            User, col(User.id) == col(AuditEvent.user_id), isouter=True
        )
        if user_id is not None:
            query = query.where(AuditEvent.user_id == user_id)
        if kind is not None:
            query = query.where(AuditEvent.kind == kind)
        query = query.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc()).limit(limit)
        return [(event, email) for event, email in (await session.exec(query)).all()]

    asyncio.run(_file_pending_audit_lines(settings))
    rows = _run_with_session(settings, work)
    events = [
        {**event_json(event), "user_id": event.user_id, "email": email} for event, email in rows
    ]
    text = "\n".join(
        f"{e['at']}  {e['kind']:<24}  {e['email'] or '-'}  ip={e['ip'] or '-'}"
        + (f"  device={e['device_id']}" if e["device_id"] else "")
        + (f"  approval={e['approval_id']}" if e["approval_id"] else "")
        + (f"  {json.dumps(e['detail'], sort_keys=True)}" if e["detail"] else "")
        for e in events
    )
    return Result({"events": events}, text or "No events.")


# --- entry point --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the `tapprove` command line and exit with its status."""
    args = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args
    stdout = sys.stdout
    # With --json, anything a library prints goes to stderr so stdout holds one object only.
    redirect = contextlib.redirect_stdout(sys.stderr) if json_mode else contextlib.nullcontext()
    try:
        with redirect:
            outcome = app(args=args, prog_name="tapprove", standalone_mode=False)
    except VersionRequested:
        version = package_version()
        outcome = Result({"version": version}, f"tapprove {version}")
    except CliFailure as exc:
        _fail(json_mode, stdout, exc.code, exc.message, exc.exit_code)
    except accounts.AccountError as exc:
        _fail(json_mode, stdout, exc.code, exc.message, 1)
    except typer.TyperException as exc:
        # Usage errors from the command-line parser (typer's own copy of click).
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=sys.stderr)
        message = exc.format_message() or "usage error"
        _fail(json_mode, stdout, "usage", message, exc.exit_code, echo=not callable(show))
    except (typer.Abort, KeyboardInterrupt):
        _fail(json_mode, stdout, "interrupted", "interrupted", 130)
    except Exception as exc:
        logging.getLogger("tapprove.cli").exception("command failed")
        _fail(json_mode, stdout, "internal_error", f"{type(exc).__name__}: {exc}", 1)
    if isinstance(outcome, Result):
        if json_mode:
            stdout.write(json.dumps(outcome.payload) + "\n")
        else:
            stdout.write(outcome.text + "\n")
        stdout.flush()
        sys.exit(0)
    # The parser returns the exit code for --help; commands that serve return None.
    sys.exit(outcome if isinstance(outcome, int) else 0)


def _fail(
    json_mode: bool,
    stdout: Any,
    code: str,
    message: str,
    exit_code: int,
    *,
    echo: bool = True,
) -> None:
    if echo:
        sys.stderr.write(f"error: {message}\n")
    if json_mode:
        stdout.write(json.dumps({"error": code, "message": message}) + "\n")
        stdout.flush()
    sys.exit(exit_code or 1)


if __name__ == "__main__":
    main()
