"""Reading a Duo request's parameters (pure): form or JSON bodies, query strings, and the
checks that keep hostile values away from SQL, Redis and BSON."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from urllib.parse import parse_qsl

import orjson

from app.duo.signatures import Params
from app.web.relying_party import UNSHOWN

# No parameter a Duo client sends comes near this; pushinfo, the longest, is a few hundred.
MAX_VALUE = 2048
MAX_PARAMS = 32


class BadParams(Exception):
    """Parameters that cannot be read or are not allowed; Duo's 40002."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_query(raw: bytes | str) -> Params:
    """Name/value pairs of a form body or query string (UTF-8, `+` for space)."""
    try:
        text = raw.decode("utf-8", "strict") if isinstance(raw, bytes) else raw
        return parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_PARAMS,
        )
    except (UnicodeDecodeError, ValueError):
        raise BadParams("parameters are not valid URL-encoded UTF-8, or too many") from None


def parse_json(body: bytes) -> Params:
    """The pairs of a JSON object whose values are all strings (what duo_client sends)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadParams("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadParams("body must be a JSON object")
    if len(data) > MAX_PARAMS:
        raise BadParams("too many parameters")
    pairs: Params = []
    for key, value in data.items():
        if not isinstance(value, str):
            raise BadParams(f"{key[:40]}: must be a string")
        pairs.append((key, value))
    return pairs


def checked(pairs: Params) -> dict[str, str]:
    """The parameters as a mapping: each name once, no NUL or other control character
    except tab and newline, no value over MAX_VALUE characters."""
    found: dict[str, str] = {}
    for key, value in pairs:
        name = key[:40]
        if key in found:
            raise BadParams(f"{name}: given more than once")
        if len(key) > 64 or len(value) > MAX_VALUE:
            raise BadParams(f"{name}: too long")
        if not (_printable(key) and _printable(value)):
            # PostgreSQL text cannot hold NUL, and the C clients read strings up to one.
            raise BadParams(f"{name}: must not contain control characters")
        found[key] = value
    return found


def _printable(text: str) -> bool:
    return all(ch >= " " or ch in "\t\n" for ch in text) and "\x7f" not in text


def required(params: Mapping[str, str], name: str) -> str:
    """A parameter that must be given and not empty."""
    value = params.get(name, "")
    if not value:
        raise BadParams(f"{name}: missing")
    return value


MAX_PUSHINFO_PAIRS = 8


def pushinfo_details(pushinfo: str) -> list[tuple[str, str]]:
    """The labelled lines of a `pushinfo` (URL-encoded pairs, `Server+IP=…&Command=…`) for
    the phone to show; BadParams if it cannot be read or holds control characters."""
    if not pushinfo:
        return []
    pairs = checked(parse_query(pushinfo)[:MAX_PUSHINFO_PAIRS])
    return [(shown(label[:40]), shown(value[:200])) for label, value in pairs.items() if label]


def shown(text: str) -> str:
    """`text` as the phone may show it: a character that is not shown as itself (a newline in
    a command, a bidi override) becomes U+FFFD, so a value cannot forge or hide a line."""
    return "".join("\ufffd" if unicodedata.category(c) in UNSHOWN else c for c in text)
