"""What a route declares about itself for the contract: its typed answers, request body,
authentication and query parameters (docs/protocol.md).

Each route module defines the pydantic models of its JSON answers next to its handlers; a
handler builds one and returns `answer(model)`, and `@answers(...)` on the handler names the
models per status code. app.web.openapi reads these declarations off the route table, so
`GET /openapi.json` is built from the same models that produce the bytes on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from app.approval.model import END_REASONS
from app.web.errors import FastJSON

JSON = "application/json"
HTML = "text/html"
PROMETHEUS = "text/plain; version=0.0.4"
MANIFEST = "application/manifest+json"
JAVASCRIPT = "text/javascript"

Schema = dict[str, Any]


def _open_object(schema: Schema) -> None:
    # Members may be added to an answer (docs/protocol.md): clients must not refuse one.
    schema.pop("additionalProperties", None)


class Answer(BaseModel):
    """Base of every JSON answer: its members in the order they go on the wire.

    Unknown members are refused when a handler builds one (a typo is a bug, not a new member);
    the published schema leaves objects open, since the contract may add members.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_open_object)


def answer(body: Answer, status: int = 200, headers: dict[str, str] | None = None) -> FastJSON:
    """The HTTP response for a typed answer, rendered with orjson.

    A member is on the wire unless it is declared `omitted_if_none()` and is None, so the
    bytes are those the protocol names: `null` where it says null, nothing where it says absent.
    """
    return FastJSON(body.model_dump(), status_code=status, headers=headers)


def _absent_if_none(value: object) -> bool:
    return value is None


def _no_default(schema: Schema) -> None:
    schema.pop("default", None)


def omitted_if_none(description: str | None = None) -> Any:
    """A member that is left out of the answer, rather than sent as null, when it is None
    (type it `X | SkipJsonSchema[None]`: the schema then says X, not required)."""
    return Field(
        default=None,
        exclude_if=_absent_if_none,
        json_schema_extra=_no_default,
        description=description,
    )


Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
ApprovalStatus = Literal["pending", "approved", "denied", "expired"]
Channel = Literal["websocket", "fcm", "apns", "webpush", "sms", "email"]
Reason = Annotated[
    Literal[END_REASONS] | None,  # type: ignore[valid-type]
    Field(
        description="Why the approval ended; null while pending. approved: device, sms_code, "
        "passcode; denied: denied, fraud, wrong_number, too_many_codes; expired: timeout "
        "(nobody answered in time), superseded (a newer approval for the same user replaced "
        "it). An addition to PROTOCOL.md v1: docs/protocol.md §2.3."
    ),
]


class Done(Answer):
    """An answer that only says what happened (`verified`, `revoked`, `sms_sent`, ...)."""

    status: str


class Decision(Answer):
    """How a decision, a code or a passcode ended the approval."""

    status: Literal["approved", "denied"]


class Match(Answer):
    """How the person proves they see the right request (confirm: Duo's phone-only mode)."""

    mode: Literal["typed", "choices", "nist", "confirm"]
    digits: Literal[2, 6]


class Error(Answer):
    """The one error shape; `status` is the approval's final status where that is news."""

    error: str
    message: str
    status: ApprovalStatus | SkipJsonSchema[None] = omitted_if_none()


# --- declarations read by app.web.openapi --------------------------------------------------

SESSION = ("session",)
DEVICE = ("deviceToken",)
RP_KEY = ("apiKey",)
LOGIN = ("loginCookie",)

RATE_LIMITED = "rate_limited (with Retry-After)"


@dataclass(frozen=True)
class Reply:
    """One documented answer: a description and its body, a typed model or (for what is not
    JSON: pages, scripts, metrics) a media type and schema."""

    description: str
    model: type[Answer] | None = None
    schema: Schema | None = None
    media: str = JSON
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Query:
    """A query-string parameter."""

    name: str
    description: str
    schema: Schema
    required: bool = False


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers, beyond what the route table says."""

    replies: dict[int, Reply | str]  # a plain string is an error answer with the Error body
    body: type[BaseModel] | None = None
    auth: tuple[str, ...] = ()  # security scheme names (any one of them)
    query: tuple[Query, ...] = ()
    description: str = ""
    store: bool = True  # touches Redis or the database, so may answer 503


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

_ATTRIBUTE = "contract_operation"


def answers(
    replies: dict[int, Reply | str],
    *,
    body: type[BaseModel] | None = None,
    auth: tuple[str, ...] = (),
    query: tuple[Query, ...] = (),
    description: str = "",
    store: bool = True,
) -> Callable[[Endpoint], Endpoint]:
    """Declare a handler's answers (and body, auth, query); the handler itself is unchanged."""
    declared = Operation(replies, body, auth, query, description, store)

    def attach(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _ATTRIBUTE, declared)
        return endpoint

    return attach


def declared_operation(endpoint: object) -> Operation | None:
    """What `@answers` declared on this endpoint, if anything."""
    found = getattr(endpoint, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None
