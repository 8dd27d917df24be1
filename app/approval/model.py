"""The approval itself: what a login (or a relying party) asks a user's phone to confirm,
its status, and how it is written to and read from the store's flat hash. Pure: no I/O."""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal, TypeVar, cast

import orjson

from app.core.clock import rfc3339
from app.core.matching import MatchPolicy, draw_number
from app.core.tokens import b64url

ApprovalKind = Literal["login", "rp"]

_T = TypeVar("_T")

APPROVAL_KINDS: tuple[ApprovalKind, ...] = ("login", "rp")

# An approval id is 32 lowercase hex characters: the first two name the shard its keys live
# in, so any process finds them from the id alone (app.approval.keys); 120 random bits follow.
MAX_SHARDS = 256
_HEX = frozenset("0123456789abcdef")


def new_approval_id(shard: int) -> str:
    """A fresh approval id whose keys live in `shard` (0 to MAX_SHARDS - 1)."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard must be from 0 to {MAX_SHARDS - 1}")
    return f"{shard:02x}{secrets.token_hex(15)}"


def shard_of_id(approval_id: str) -> int | None:
    """The shard an approval id names; None when it cannot be one of ours."""
    if len(approval_id) != 32 or not _HEX.issuperset(approval_id):
        return None
    return int(approval_id[:2], 16)


class Status(StrEnum):
    """Where an approval is in its life: pending until it is approved, denied or expired."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        """Whether the approval has ended; a final status never changes again."""
        return self is not Status.PENDING


# Why an approval ended, reported with its final status (RP API, browser stream, device
# events). The specific ones are set where they happen: `sms_code` (approved with a texted
# code), `passcode` (approved with an offline passcode from a device), `fraud` (denied and
# reported), `wrong_number` (approved with a number that did not match, so denied),
# `too_many_codes` (five wrong SMS codes or passcodes), `superseded` (expired because a
# newer approval for the same user replaced it). An end that names no reason gets its
# status's default here (app.approval.rules.end_reason: the store's scripts are given it).
DEFAULT_REASONS: dict[Status, str] = {
    Status.APPROVED: "device",  # approved on an enrolled device
    Status.DENIED: "denied",  # a plain denial on a device
    Status.EXPIRED: "timeout",  # nobody answered before expires_at
}
END_REASONS: tuple[str, ...] = (
    "device",
    "sms_code",
    "passcode",
    "denied",
    "fraud",
    "wrong_number",
    "too_many_codes",
    "timeout",
    "superseded",
)


@dataclass(frozen=True)
class ApprovalContext:
    """What the phone shows about the sign-in attempt so the person can recognise it.

    `details` are labelled lines a relying party adds about its own request (a Duo client's
    `pushinfo`, e.g. ("Command", "sudo reboot")); the `context` object carries them as
    `details: [{"label","value"}]` only when there are some (an addition to PROTOCOL §3).
    """

    ip: str
    user_agent: str
    browser: str
    os: str
    details: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, object]:
        """The protocol's `context` object."""
        out: dict[str, object] = {
            "ip": self.ip,
            "user_agent": self.user_agent,
            "browser": self.browser,
            "os": self.os,
        }
        if self.details:
            out["details"] = [{"label": label, "value": value} for label, value in self.details]
        return out

    @classmethod
    def from_json(cls, obj: object) -> ApprovalContext:
        """Read a `context` object back; ValueError unless its four members are strings."""
        if not isinstance(obj, dict):
            raise ValueError("context must be an object")
        values = [obj.get(name) for name in ("ip", "user_agent", "browser", "os")]
        if not all(isinstance(v, str) for v in values):
            raise ValueError("context members ip, user_agent, browser, os must be strings")
        ip, user_agent, browser, os = cast(list[str], values)
        return cls(
            ip=ip, user_agent=user_agent, browser=browser, os=os, details=_details(obj)
        )


def _details(obj: dict[str, object]) -> tuple[tuple[str, str], ...]:
    raw = obj.get("details", [])
    if not isinstance(raw, list):
        raise ValueError("context details must be a list")
    pairs: list[tuple[str, str]] = []
    for item in raw:
        label = item.get("label") if isinstance(item, dict) else None
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(label, str) or not isinstance(value, str):
            raise ValueError("each context detail is {label, value} with two strings")
        pairs.append((label, value))
    return tuple(pairs)


# kw_only: twenty positional fields would be too easy to get in the wrong order.
@dataclass(kw_only=True)
class PendingApproval:
    """One approval request and its outcome, as the store keeps it."""

    id: str
    user_id: str
    kind: ApprovalKind
    status: Status
    created_at: float
    expires_at: float
    challenge: str
    number: str
    match: MatchPolicy
    choices: list[str] | None
    context: ApprovalContext
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None
    browser_binding: str | None = None
    remember_browser: bool = False
    api_key_id: str | None = None
    channels: list[str] = field(default_factory=list)
    completed: bool = False
    # The id of the request that started it, so logs can follow it across processes.
    request_id: str | None = None
    # The relying party's API key name, shown on the phone as who asks (kind "rp").
    requester_name: str | None = None

    @property
    def final_reason(self) -> str | None:
        """Why it ended (one of END_REASONS), None while pending."""
        if not self.status.final:
            return None
        return self.reason or DEFAULT_REASONS[self.status]

    def device_json(self) -> dict[str, object]:
        """The protocol's Approval object for a phone (§3); it never holds the number itself."""
        out: dict[str, object] = {
            "id": self.id,
            "status": self.status.value,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "context": self.context.to_json(),
            "match": self.match.to_json(),
            # Who asks: a browser sign-in, or a relying party named by its API key.
            "requester": {"kind": self.kind, "name": self.requester_name},
        }
        # In typed and nist modes the person must type what the browser shows, so no hint at all.
        if self.match.offers_choices and self.choices is not None:
            out["number_choices"] = list(self.choices)
        out["challenge"] = self.challenge
        return out

    def ended(self, event: Mapping[str, object]) -> PendingApproval | None:
        """This approval with the status, time and reason a `result` event announced (the
        store publishes one when an approval ends); None when the event does not say all
        three (the caller then reads the approval)."""
        try:
            status = Status(str(event["status"]))
            decided_at = float(str(event["decided_at"]))
        except (KeyError, ValueError):
            return None
        reason = event.get("reason")
        if not status.final or not isinstance(reason, str) or not reason:
            return None
        return replace(self, status=status, decided_at=decided_at, reason=reason)

    def to_fields(self) -> dict[str, str]:
        """Flatten to string fields for a Redis hash; `None` values are left out."""
        fields: dict[str, str] = {
            "id": self.id,
            "user_id": self.user_id,
            "kind": self.kind,
            "status": self.status.value,
            "created_at": repr(float(self.created_at)),
            "expires_at": repr(float(self.expires_at)),
            "challenge": self.challenge,
            "number": self.number,
            "match": _dump(self.match.to_json()),
            "context": _dump(self.context.to_json()),
            "remember_browser": _flag(self.remember_browser),
            "channels": _dump(self.channels),
            "completed": _flag(self.completed),
        }
        optional: dict[str, str | None] = {
            "choices": None if self.choices is None else _dump(self.choices),
            "decided_at": None if self.decided_at is None else repr(float(self.decided_at)),
            "decided_by": self.decided_by,
            "reason": self.reason,
            "browser_binding": self.browser_binding,
            "api_key_id": self.api_key_id,
            "request_id": self.request_id,
            "requester_name": self.requester_name,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> PendingApproval:
        """Rebuild from a Redis hash written by `to_fields`; ValueError names a bad field."""
        reader = _FieldReader(fields)
        kind = reader.text("kind")
        if kind not in APPROVAL_KINDS:
            raise ValueError(f"field kind: unknown kind {kind!r}")
        status = reader.text("status")
        try:
            parsed_status = Status(status)
        except ValueError:
            raise ValueError(f"field status: unknown status {status!r}") from None
        choices = reader.optional_json("choices")
        return cls(
            id=reader.text("id"),
            user_id=reader.text("user_id"),
            kind=kind,
            status=parsed_status,
            created_at=reader.number("created_at"),
            expires_at=reader.number("expires_at"),
            challenge=reader.text("challenge"),
            number=reader.text("number"),
            match=reader.parsed("match", MatchPolicy.from_json),
            choices=None if choices is None else _string_list("choices", choices),
            context=reader.parsed("context", ApprovalContext.from_json),
            decided_at=reader.optional_number("decided_at"),
            decided_by=fields.get("decided_by"),
            reason=fields.get("reason"),
            browser_binding=fields.get("browser_binding"),
            remember_browser=reader.flag("remember_browser"),
            api_key_id=fields.get("api_key_id"),
            channels=_string_list("channels", reader.parsed("channels", _identity)),
            completed=reader.flag("completed"),
            request_id=fields.get("request_id"),
            requester_name=fields.get("requester_name"),
        )


def new_approval(
    *,
    user_id: str,
    kind: ApprovalKind,
    ttl: float,
    policy: MatchPolicy,
    context: ApprovalContext,
    now: float,
    browser_binding: str | None = None,
    remember_browser: bool = False,
    api_key_id: str | None = None,
    request_id: str | None = None,
    requester_name: str | None = None,
    shard: int = 0,
    rng: random.Random | None = None,
) -> PendingApproval:
    """A fresh pending approval with a new id (in `shard`), a 32-byte challenge and a drawn
    number.

    `rng` only chooses the number (and decoys); tests pass a seeded one for repeatable draws.
    """
    if not ttl > 0:
        raise ValueError("ttl must be positive")
    number, choices = draw_number(policy, rng)
    return PendingApproval(
        id=new_approval_id(shard),
        user_id=user_id,
        kind=kind,
        status=Status.PENDING,
        created_at=now,
        expires_at=now + ttl,
        challenge=b64url(secrets.token_bytes(32)),
        number=number,
        match=policy,
        choices=choices,
        context=context,
        browser_binding=browser_binding,
        remember_browser=remember_browser,
        api_key_id=api_key_id,
        request_id=request_id,
        requester_name=requester_name,
    )


def _dump(value: object) -> str:
    return orjson.dumps(value).decode()


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _identity(value: object) -> object:
    return value


def _string_list(name: str, value: object) -> list[str]:
    # Lua's cjson (the store's scripts) encodes an empty table as {} rather than [].
    if value == {}:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field {name}: expected a list of strings")
    return cast(list[str], value)


class _FieldReader:
    """Reads typed values out of a flat string hash, naming the field in every error."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = fields

    def text(self, name: str) -> str:
        try:
            return self._fields[name]
        except KeyError:
            raise ValueError(f"field {name}: missing") from None

    def number(self, name: str) -> float:
        raw = self.text(name)
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"field {name}: not a number: {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"field {name}: not a finite number")
        return value

    def optional_number(self, name: str) -> float | None:
        return self.number(name) if name in self._fields else None

    def flag(self, name: str) -> bool:
        raw = self.text(name)
        if raw not in ("0", "1"):
            raise ValueError(f"field {name}: expected '0' or '1', got {raw!r}")
        return raw == "1"

    def optional_json(self, name: str) -> object:
        if name not in self._fields:
            return None
        try:
            value: object = orjson.loads(self._fields[name])
        except ValueError:
            raise ValueError(f"field {name}: not JSON") from None
        return value

    def parsed(self, name: str, parse: Callable[[object], _T]) -> _T:
        raw = self.text(name)
        try:
            return parse(orjson.loads(raw))
        except ValueError as exc:
            raise ValueError(f"field {name}: {exc}") from None
