"""A fake Twilio Messages API (`POST /2010-04-01/Accounts/{sid}/Messages.json`), on aiohttp."""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes import AiohttpFake, Reply

# Answers, shaped like Twilio's (https://www.twilio.com/docs/api/errors)


def _error(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def invalid_number(to: str = "+15005550001") -> Reply:
    """400 / 21211: the To number is not a valid phone number."""
    return Reply(400, _error(400, 21211, f"The 'To' number {to} is not a valid phone number."))


def not_mobile(to: str = "+15005550009") -> Reply:
    """400 / 21614: the To number is not a mobile number."""
    return Reply(400, _error(400, 21614, f"'To' number {to} is not a valid mobile number"))


def unauthorized() -> Reply:
    return Reply(401, _error(401, 20003, "Authenticate"))


def too_many_requests(retry_after: int | None = 1) -> Reply:
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return Reply(429, _error(429, 20429, "Too Many Requests"), headers=headers)


def service_unavailable(retry_after: int | None = 5) -> Reply:
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return Reply(503, _error(503, 20503, "Service Unavailable"), headers=headers)


def slow(delay: float) -> Reply:
    """An acceptance that comes only after `delay` seconds (to make the client time out)."""
    return Reply(201, {"sid": f"SM{secrets.token_hex(16)}", "status": "queued"}, delay=delay)


@dataclass(frozen=True)
class TwilioRequest:
    """One message creation request as the fake received it."""

    path: str
    account_sid: str
    form: dict[str, str]
    headers: dict[str, str]

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """(user, password) from `Authorization: Basic ...`, or None."""
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user, password


class FakeTwilio(AiohttpFake):
    """Records message requests; unless scripted, answers 201 for the right credentials
    (`account_sid` / `auth_token`) and 401 otherwise, as Twilio does."""

    def __init__(
        self, account_sid: str = "AC" + "0" * 30 + "01", auth_token: str = "test-auth-token"
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[TwilioRequest] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        record = TwilioRequest(
            request.path,
            request.match_info["sid"],
            {k: str(v) for k, v in form.items()},
            dict(request.headers),
        )
        self.requests.append(record)
        if record.basic_auth != (self.account_sid, self.auth_token):
            return self.respond(unauthorized())
        reply = self.replies.next()
        if reply is None:
            reply = Reply(
                201,
                {
                    "sid": f"SM{secrets.token_hex(16)}",
                    "account_sid": record.account_sid,
                    "to": record.form.get("To"),
                    "from": record.form.get("From"),
                    "body": record.form.get("Body"),
                    "status": "queued",
                },
            )
        await self.pause(reply.delay)
        return self.respond(reply)
