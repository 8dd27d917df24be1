"""Passkeys (WebAuthn, checked with py_webauthn): adding one from the account page, and a
usernameless sign-in with one from the login page that needs no password and no phone.

The rules:
- Registration asks for a discoverable (resident) credential with user verification, ES256
  or RS256, no attestation; the relying party id is the public URL's host and the only
  accepted origin is the public URL's (a page on another origin, a phishing proxy's, is
  refused).
- Every ceremony answers a challenge of its own: single use, CHALLENGE_TTL seconds, bound to
  its purpose and, for a registration, to the signed-in user (app.store.webauthn).
- A sign-in names its credential; the credential's owner is the one signed in, and the
  user handle the authenticator returns must be that owner's (it cannot speak for another
  account). The signature counter must move forward unless the authenticator keeps none
  (always 0); one that goes backwards is refused and audited (a cloned authenticator).
- Settings: `passkey_login` off means no passkey sign-in and none can be added;
  `passkey_allows_push` off means an account with a passkey must use it (app.web.browser).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    options_to_json_dict,
    parse_client_data_json,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from app.approval.model import ApprovalContext
from app.core.clock import to_datetime
from app.core.errors import ApiError
from app.core.tokens import new_id
from app.db import audit
from app.db import passkeys as stored
from app.db.models import Passkey, User
from app.delivery import notices, outbox
from app.services import Services
from app.store.webauthn import Purpose

log = logging.getLogger(__name__)

RP_NAME = "tapprove"
CHALLENGE_TTL = 300
CEREMONY_TIMEOUT_MS = 120_000
ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
DEFAULT_NAME = "Passkey"


def refused(message: str) -> ApiError:
    """The one answer to a passkey that does not check out."""
    return ApiError(400, "passkey_refused", message)


EXPIRED = "this passkey request expired or was already used; try again"
UNVERIFIED = "the passkey's answer could not be verified"


def require_enabled(svc: Services) -> None:
    """403 `passkeys_disabled` when passkeys are turned off on this server."""
    if not svc.settings.passkey_login:
        raise ApiError(403, "passkeys_disabled", "passkeys are turned off on this server")


def user_handle(user_id: str) -> bytes:
    """The WebAuthn user handle of an account: its id (random, says nothing about the person)."""
    return user_id.encode("ascii")


async def _taken_challenge(
    svc: Services, credential: dict[str, Any], purpose: Purpose, user_id: str | None
) -> bytes:
    """The challenge the credential's answer names, taken (it is single use); refused if it
    is unknown, expired, used, or was issued for something else."""
    try:
        client_data = parse_client_data_json(
            base64url_to_bytes(credential["response"]["clientDataJSON"])
        )
        challenge = client_data.challenge
    except Exception:  # any malformed answer is the same refusal
        raise refused(UNVERIFIED) from None
    issued = await svc.webauthn.take(challenge)
    if issued is None or issued.purpose != purpose or issued.user_id != user_id:
        raise refused(EXPIRED)
    return challenge


# --- adding a passkey (account page) ---------------------------------------------------------


async def registration_options(svc: Services, user: User) -> dict[str, Any]:
    """`PublicKeyCredentialCreationOptions` (JSON form) for adding a passkey to `user`."""
    require_enabled(svc)
    async with svc.db() as db:
        existing = await stored.user_passkeys(db, user.id)
    challenge = await svc.webauthn.issue("register", user_id=user.id, ttl=CHALLENGE_TTL)
    options = generate_registration_options(
        rp_id=svc.settings.webauthn_rp_id,
        rp_name=RP_NAME,
        user_name=user.email,
        user_id=user_handle(user.id),
        user_display_name=user.email,
        challenge=challenge,
        timeout=CEREMONY_TIMEOUT_MS,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            require_resident_key=True,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(p.credential_id))
            for p in existing
        ],
        supported_pub_key_algs=ALGORITHMS,
    )
    found: dict[str, Any] = options_to_json_dict(options)
    return found


async def add(
    svc: Services,
    user: User,
    credential: dict[str, Any],
    name: str | None,
    *,
    context: ApprovalContext,
) -> Passkey:
    """Verify a new credential for `user` and keep it; the owner is mailed."""
    require_enabled(svc)
    challenge = await _taken_challenge(svc, credential, "register", user.id)
    try:
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=svc.settings.webauthn_rp_id,
            expected_origin=svc.settings.webauthn_origin,
            require_user_verification=True,
            supported_pub_key_algs=ALGORITHMS,
        )
    except Exception as exc:  # py_webauthn's and its parsers' errors alike
        log.info("passkey registration refused: %s", exc, extra={"user_id": user.id})
        raise refused(UNVERIFIED) from None
    if credential.get("rawId") != bytes_to_base64url(verified.credential_id):
        # The answer must name the credential its authenticator data holds.
        raise refused(UNVERIFIED)
    now = svc.clock.now()
    passkey = Passkey(
        id=new_id(),
        user_id=user.id,
        credential_id=bytes_to_base64url(verified.credential_id),
        public_key=bytes_to_base64url(verified.credential_public_key),
        sign_count=verified.sign_count,
        name=(name or "").strip() or DEFAULT_NAME,
        aaguid=str(verified.aaguid)[:36],
        created_at=to_datetime(now),
    )
    exists = ApiError(409, "passkey_exists", "this passkey is already registered")
    try:
        async with svc.db() as db:
            if await stored.by_credential_id(db, passkey.credential_id) is not None:
                raise exists
            db.add(passkey)
            await audit.record(
                db,
                "passkey.added",
                user_id=user.id,
                ip=context.ip,
                detail={"passkey_id": passkey.id, "name": passkey.name},
                now=now,
            )
            notice = notices.passkey_added(
                svc.settings, db, user, passkey, context=context, now=now
            )
            await db.commit()
    except IntegrityError:  # the same credential registered at the same moment
        raise exists from None
    await outbox.kick(svc, notice.id)
    return passkey


# --- signing in with a passkey (login page) --------------------------------------------------


async def login_options(svc: Services) -> dict[str, Any]:
    """`PublicKeyCredentialRequestOptions` (JSON form) for a usernameless sign-in: no
    credentials are listed, the authenticator offers the ones it holds for this site."""
    require_enabled(svc)
    challenge = await svc.webauthn.issue("login", user_id=None, ttl=CHALLENGE_TTL)
    options = generate_authentication_options(
        rp_id=svc.settings.webauthn_rp_id,
        challenge=challenge,
        timeout=CEREMONY_TIMEOUT_MS,
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    found: dict[str, Any] = options_to_json_dict(options)
    return found


async def sign_in(svc: Services, credential: dict[str, Any], *, ip: str) -> User:
    """The user a passkey's answer signs in, or the refusal (400 `passkey_refused`, 423)."""
    require_enabled(svc)
    challenge = await _taken_challenge(svc, credential, "login", None)
    now = svc.clock.now()
    async with svc.db() as db:
        passkey = await stored.by_credential_id(db, str(credential["id"]))
        if passkey is None:
            raise refused("this passkey is not registered here (it may have been removed)")
        handle = credential["response"].get("userHandle")
        if handle is not None and _handle_bytes(handle) != user_handle(passkey.user_id):
            await _audit_refusal(svc, db, passkey, ip, now, reason="user_handle")
            raise refused(UNVERIFIED)
        try:
            verified = verify_authentication_response(
                credential=credential,
                expected_challenge=challenge,
                expected_rp_id=svc.settings.webauthn_rp_id,
                expected_origin=svc.settings.webauthn_origin,
                credential_public_key=base64url_to_bytes(passkey.public_key),
                # The counter is compared below, after the signature: only a genuine
                # answer may report a clone.
                credential_current_sign_count=0,
                require_user_verification=True,
            )
        except Exception as exc:  # py_webauthn's and its parsers' errors alike
            log.info("passkey sign-in refused: %s", exc, extra={"user_id": passkey.user_id})
            raise refused(UNVERIFIED) from None
        seen, new = passkey.sign_count, verified.new_sign_count
        if (new > 0 or seen > 0) and new <= seen:
            await _audit_refusal(
                svc, db, passkey, ip, now, reason="counter_went_back", stored=seen, presented=new
            )
            raise refused(
                "this passkey's signature counter went backwards, which a copied "
                "authenticator would do; sign in another way and check your passkeys"
            )
        if not await stored.count_use(db, passkey.id, seen=seen, new=new, now=now):
            raise refused(EXPIRED)
        user = await db.get(User, passkey.user_id)
        if user is None or not user.email_verified:
            raise refused(UNVERIFIED)
        if user.locked:
            raise ApiError(423, "locked", "sign-in is locked after a fraud report; contact support")
        await audit.record(
            db, "login.passkey", user_id=user.id, ip=ip, detail={"passkey_id": passkey.id}, now=now
        )
        await db.commit()
    return user


def _handle_bytes(handle: object) -> bytes | None:
    if not isinstance(handle, str):
        return None
    try:
        return base64url_to_bytes(handle)
    except ValueError:
        return None


async def _audit_refusal(
    svc: Services,
    db: AsyncSession,
    passkey: Passkey,
    ip: str,
    now: float,
    *,
    reason: str,
    **detail: object,
) -> None:
    """Record a genuine-looking passkey answer refused for a reason worth an alert."""
    await audit.record(
        db,
        "passkey.refused",
        user_id=passkey.user_id,
        ip=ip,
        detail={"passkey_id": passkey.id, "reason": reason, **detail},
        now=now,
    )
    await db.commit()
    log.warning(
        "passkey %s refused: %s %s",
        passkey.id,
        reason,
        orjson.dumps(detail).decode(),
        extra={"user_id": passkey.user_id},
    )
