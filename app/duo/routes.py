"""The Duo endpoints: Auth API v2 (`/auth/v2/*`, JSON) and the legacy v1 endpoints duo_unix
1.11 calls (`/rest/v1/*.bson`, BSON).

Each request is checked in this order: known endpoint and method, readable parameters, a
valid signature from a live integration, then the parameters' contents. Failures are
Duo's `{"stat":"FAIL","code","message"}` in the face's encoding, never tapprove's JSON
error shape, so a Duo client always reads them (docs/duo-compat.md lists the codes).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from app.account_cache import Recipient
from app.approval.model import ApprovalContext
from app.db.accounts import ENROLLMENT_CODE_TTL
from app.duo import answers
from app.duo import approvals as duo_approvals
from app.duo import enrollment as duo_enrollment
from app.duo.answers import Answer, Phone, Preauth
from app.duo.integrations import IntegrationDirectory, LiveIntegration, api_host_name
from app.duo.params import BadParams, checked, parse_json, parse_query, pushinfo_details, shown
from app.duo.replies import Encoding, Value, fail, ok
from app.duo.signatures import Params, SignatureRejected, SignedRequest, credentials, verify
from app.server_keys import SecretBox, secret_key
from app.services import Services
from app.web.common import client_ip, plausible_id, services
from app.web.pages import STATIC_DIR

log = logging.getLogger(__name__)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_DETAILS = 12


class DuoFailure(Exception):
    """A refusal in Duo's terms: HTTP status, Duo code, message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_params(message: str) -> DuoFailure:
    return DuoFailure(400, 40002, f"Invalid request parameters: {message}")


@dataclass(frozen=True)
class Face:
    """One version of the API: where it lives, how it encodes, which signatures it takes."""

    prefix: str
    encoding: Encoding
    legacy: bool  # v1: SHA1 signatures without Date, form bodies only

    @property
    def version(self) -> answers.Version:
        return "v1" if self.legacy else "v2"


V2 = Face("/auth/v2", Encoding.JSON, legacy=False)
V1 = Face("/rest/v1", Encoding.BSON, legacy=True)


@dataclass(frozen=True)
class Call:
    """A checked request: who signed it and what it asks."""

    request: Request
    svc: Services
    face: Face
    integration: LiveIntegration
    params: dict[str, str]


Handler = Callable[[Call], Awaitable[Value]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    handler: Handler


class DuoFace:
    """The Duo endpoints of one app and the integration directory they share."""

    def __init__(self) -> None:
        self._directory: IntegrationDirectory | None = None

    def routes(self) -> list[BaseRoute]:
        """`/auth/v2` and `/rest/v1`, each answering its unknown paths and methods itself."""
        v2 = {
            "/ping": Endpoint("GET", ping),
            "/check": Endpoint("GET", check),
            "/logo": Endpoint("GET", logo),
            "/enroll": Endpoint("POST", enroll),
            "/enroll_status": Endpoint("POST", enroll_status),
            "/preauth": Endpoint("POST", preauth),
            "/auth": Endpoint("POST", auth),
            "/auth_status": Endpoint("GET", auth_status),
        }
        v1 = {
            "/preauth.bson": Endpoint("POST", preauth),
            "/auth.bson": Endpoint("POST", auth),
            "/status.bson": Endpoint("GET", auth_status),
        }
        return [self._mount(V2, v2), self._mount(V1, v1)]

    def _mount(self, face: Face, endpoints: dict[str, Endpoint]) -> Mount:
        routes: list[BaseRoute] = [
            Route(path, self._endpoint(face, endpoint), methods=METHODS)
            for path, endpoint in endpoints.items()
        ]
        routes.append(Route("/{rest:path}", self._endpoint(face, None), methods=METHODS))
        return Mount(face.prefix, routes=routes)

    def _endpoint(
        self, face: Face, endpoint: Endpoint | None
    ) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            try:
                served = await self._serve(request, face, endpoint)
                if isinstance(served, Response):
                    return served  # the logo: an image, not a Duo document
                return ok(face.encoding, served)
            except SignatureRejected as exc:
                log.info("duo request refused: %s", exc.message, extra={"duo_code": exc.code})
                return fail(face.encoding, 401, exc.code, exc.message)
            except BadParams as exc:
                failure = bad_params(exc.message)
                return fail(face.encoding, failure.status, failure.code, failure.message)
            except DuoFailure as exc:
                return fail(face.encoding, exc.status, exc.code, exc.message)

        return serve

    async def _serve(self, request: Request, face: Face, endpoint: Endpoint | None) -> Value:
        if endpoint is None:
            raise DuoFailure(404, 40401, "Resource not found")
        if request.method != endpoint.method:
            raise DuoFailure(405, 40501, "Method not allowed")
        svc = services(request)
        if endpoint.handler is ping:
            return {"time": int(svc.clock.now())}
        body = await request.body()
        query, form, given = _params(request, face, body)
        ikey, signature = credentials(request.headers.get("authorization"))
        integration = await self._integrations(svc).by_ikey(ikey)
        if integration is None:
            raise SignatureRejected(40103, "Invalid signature in request credentials")
        signed = SignedRequest(
            method=request.method,
            host=api_host_name(svc.settings.public_url),
            path=request.url.path,
            query=query,
            form=form,
            body=body,
            date=request.headers.get("date"),
            duo_headers={k: v for k, v in request.headers.items() if k.startswith("x-duo-")},
        )
        verify(signed, integration.skey, signature, legacy=face.legacy, now=svc.clock.now())
        call = Call(request, svc, face, integration, checked(given))
        return await endpoint.handler(call)

    def _integrations(self, svc: Services) -> IntegrationDirectory:
        if self._directory is None:
            box = SecretBox(secret_key(svc.settings), "duo-skey")
            self._directory = IntegrationDirectory(svc.db, box, svc.clock)
        return self._directory


def _params(request: Request, face: Face, body: bytes) -> tuple[Params, Params, Params]:
    """The query's pairs, the form body's, and those the endpoint reads (either, or JSON)."""
    query = parse_query(request.scope.get("query_string", b""))
    if request.method == "GET" or not body:
        return query, [], query
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        form = parse_query(body)
        return query, form, form
    if kind == "application/json" and not face.legacy:
        return query, [], parse_json(body)
    raise BadParams("the body must be a form (or JSON for /auth/v2)")


# --- endpoints ------------------------------------------------------------------------------


async def ping(call: Call) -> Value:
    """GET /auth/v2/ping: unsigned, like Duo's (answered before the signature check)."""
    return {"time": int(call.svc.clock.now())}


async def check(call: Call) -> Value:
    """GET /auth/v2/check: the keys and the signature are right."""
    return {"time": int(call.svc.clock.now())}


LOGO = STATIC_DIR / "icons" / "icon-192.png"


async def logo(call: Call) -> Value:
    """GET /auth/v2/logo (signed): the logo as a PNG, which clients show beside the prompt
    (tapprove's own icon; a deployment without static files answers 404 40401)."""
    try:
        image = LOGO.read_bytes()
    except OSError:
        raise DuoFailure(404, 40401, "No logo is configured") from None
    return Response(image, media_type="image/png")


# An integration may make this many enrollment links an hour, and this many for one user.
ENROLL_PER_INTEGRATION = 60
ENROLL_PER_USER = 5


def _may_enroll(call: Call) -> None:
    """enroll and enroll_status are for integrations created with --allow-enroll only."""
    if not call.integration.allow_enroll:
        raise DuoFailure(
            403,
            40301,
            "Enrollment through the Auth API is not enabled for this integration; users "
            f"enroll at {_portal(call)}",
        )


async def enroll(call: Call) -> Value:
    """POST /auth/v2/enroll: an enrollment link for the first device of an existing user
    who never had a second factor (app.duo.enrollment); tapprove makes no users up, so
    `username` is required, and `bypass_codes` are not supported."""
    _may_enroll(call)
    if "bypass_codes" in call.params:
        raise bad_params("bypass_codes: not supported")
    name = call.params.get("username", "")
    if not name:
        raise bad_params("username: missing (tapprove enrolls existing users only)")
    valid_secs = call.params.get("valid_secs", str(ENROLLMENT_CODE_TTL))
    if not valid_secs.isascii() or not valid_secs.isdigit() or not int(valid_secs[:9]) > 0:
        raise bad_params("valid_secs: a positive number of seconds")
    email = await duo_approvals.email_of(call.svc, name) or call.integration.email_for(name)
    svc = call.svc
    for key, limit in (
        (svc.limits.key("duo-enroll", call.integration.id), ENROLL_PER_INTEGRATION),
        (svc.limits.key("duo-enroll", "user", (email or name)[:320]), ENROLL_PER_USER),
    ):
        verdict = await svc.limits.hit(key, limit=limit, window=3600)
        if not verdict.allowed:
            raise DuoFailure(
                429, 42901, f"Too many enrollments; try again in {verdict.retry_after} seconds"
            )
    activation = None
    if email is not None:
        activation = await duo_enrollment.start(
            svc, call.integration, email, name, valid_secs=int(valid_secs[:9]),
            ip=client_ip(call.request),
        )  # fmt: skip
    if activation is None:
        # One answer for a username nobody has and for a user who has or had a device.
        raise bad_params(
            "username: no user who may enroll a first device here; a user who has or had "
            f"one adds devices at {_portal(call)}"
        )
    return activation.v2()


async def enroll_status(call: Call) -> Value:
    """POST /auth/v2/enroll_status: `success`, `waiting` or `invalid` for a link `enroll`
    made (Duo answers the bare string)."""
    _may_enroll(call)
    user_id = call.params.get("user_id", "")
    code = call.params.get("activation_code", "")
    if not user_id or not code:
        raise bad_params("user_id and activation_code: both required")
    if not plausible_id(user_id):
        return "invalid"
    return await duo_enrollment.status(call.svc, user_id, code)


def _portal(call: Call) -> str:
    return f"{call.svc.settings.public_url}/"


def _username(call: Call) -> str:
    """Who the request names: `user` (v1), or `username` / `user_id` (v2)."""
    if call.face.legacy:
        name = call.params.get("user", "")
    else:
        # user_id: what authentik's manual device import stores (a user's tapprove id or
        # email, see docs/duo-compat.md); the same as a username here.
        name = call.params.get("username", "") or call.params.get("user_id", "")
    if not name:
        raise bad_params("user: missing" if call.face.legacy else "username: missing")
    return name


async def _user(call: Call, *, fresh: bool) -> Recipient | None:
    """The tapprove user the request names, if they exist and have a phone."""
    name = _username(call)
    email = await duo_approvals.email_of(call.svc, name) or call.integration.email_for(name)
    if email is None:
        return None
    user = await duo_approvals.recipient(call.svc, email, fresh=fresh)
    return user if user is not None and user.devices else None


async def preauth(call: Call) -> Value:
    """preauth: `auth` with the user's phones, `enroll` for a user with none (and for a
    username nobody has: the same answer, see docs/duo-compat.md), `deny` when locked."""
    user = await _user(call, fresh=True)
    if user is None:
        result = answers.enroll(_portal(call))
    elif user.user.locked:
        result = answers.PREAUTH_LOCKED
    else:
        seeded, number = await duo_approvals.capabilities(call.svc, user.user.id)
        result = answers.active(
            [Phone(d.id, d.name, d.id in seeded, number) for d in user.devices]
        )
    return _preauth_reply(call, result)


def _preauth_reply(call: Call, result: Preauth) -> Value:
    return result.v1(_username(call)) if call.face.legacy else result.v2()


Factor = Literal["push", "passcode", "sms"]


async def auth(call: Call) -> Value:
    """auth: push to the user's phones and answer at the end (sync) or with a txid; or check
    a passcode, or text SMS passcodes, whose answer is final at once (a txid for it too
    when asked to be asynchronous)."""
    factor, typed = _factor(call)
    context = _context(call)  # reads pushinfo: a malformed one is refused for anybody
    user = await _user(call, fresh=factor != "push")
    if user is None:
        enroll_first = answers.Answer(
            answers.Result.DENY, "deny", answers.enroll(_portal(call)).message
        )
        return _final(call, enroll_first)
    device = call.params.get("device", "auto")
    if device != "auto" and device not in {d.id for d in user.devices}:
        raise bad_params("device: not one of the user's devices")
    ip = client_ip(call.request)
    if factor == "passcode":
        answer = await duo_approvals.passcode(call.svc, user, call.integration, typed, ip=ip)
        return await _final_or_txid(call, answer)
    if factor == "sms":
        answer = await duo_approvals.send_sms(call.svc, user, call.integration, ip=ip)
        return await _final_or_txid(call, answer)
    started = await duo_approvals.start(call.svc, user, call.integration, context)
    if isinstance(started, Answer):
        return _final(call, started)
    if _asynchronous(call):
        return {"txid": started.id}
    return _answer_reply(call, await duo_approvals.until_end(call.svc, started))


def _asynchronous(call: Call) -> bool:
    return call.params.get("async", "0") == "1"


def _final(call: Call, answer: Answer) -> Value:
    """A refusal before any approval: answered as it is, asynchronous or not."""
    return _answer_reply(call, answer)


async def _final_or_txid(call: Call, answer: Answer) -> Value:
    """A passcode's or an SMS's answer: at once, or under a txid for an asynchronous caller
    (login_duo on a terminal sends everything with `async=1` and polls status.bson)."""
    if not _asynchronous(call):
        return _answer_reply(call, answer)
    return {"txid": await duo_approvals.keep_ended(call.svc, call.integration, answer)}


def _factor(call: Call) -> tuple[Factor, str]:
    """The factor asked for, and for a passcode what was typed. v2: `factor` auto or push,
    passcode (with `passcode`), sms; v1 (login_duo): `factor=auto` with `auto=` a factor
    name from preauth (push1, smsrefresh1) or else the passcode the person typed."""
    factor = call.params.get("factor", "")
    if call.face.legacy:
        if factor != "auto":
            raise bad_params("factor: only auto")
        chosen = call.params.get("auto", answers.PUSH_FACTOR)
        if chosen in answers.PUSH_NAMES:
            return "push", ""
        if chosen in answers.SMS_NAMES:
            return "sms", ""
        return "passcode", chosen
    if factor in ("auto", "push"):
        return "push", ""
    if factor == "passcode":
        typed = call.params.get("passcode", "")
        if not typed:
            raise bad_params("passcode: missing")
        return "passcode", typed
    if factor == "sms":
        return "sms", ""
    if factor == "phone":
        raise bad_params("factor: phone calls are not supported by this server")
    raise bad_params("factor: one of auto, push, passcode, sms")


def _context(call: Call) -> ApprovalContext:
    """What the phone shows: the client's IP (ipaddr), the integration's name as the
    application, the client program, and the request's own lines (pushinfo and co.)."""
    params = call.params
    user_agent = shown(call.request.headers.get("user-agent", "")[:512])
    details: list[tuple[str, str]] = []
    for name, label in (("type", "Request"), ("display_username", "User"), ("hostname", "Host")):
        if params.get(name):
            details.append((label, shown(params[name][:200])))
    details += pushinfo_details(params.get("pushinfo", ""))
    return ApprovalContext(
        ip=shown((params.get("ipaddr") or client_ip(call.request))[:64]),
        user_agent=user_agent,
        browser=call.integration.name[:100],
        os=(user_agent.split(" (")[0] or "Duo client")[:100],
        details=tuple(details[:MAX_DETAILS]),
    )


async def auth_status(call: Call) -> Value:
    """auth_status / status.bson: held until the approval ends or the next point of the
    status schedule (app.duo.answers); an unknown txid is a parameter error."""
    txid = call.params.get("txid", "")
    answer = await duo_approvals.status(call.svc, call.integration, txid, call.face.version)
    if answer is None:
        raise bad_params("txid: no such transaction")
    return _answer_reply(call, answer)


def _answer_reply(call: Call, answer: Answer) -> Value:
    return answer.v1() if call.face.legacy else answer.v2()
