"""Encoding Duo replies (pure): `{"stat":"OK","response":…}` and `{"stat":"FAIL","code",
"message"}`, as JSON for `/auth/v2` and as BSON for the legacy `/rest/v1/*.bson` endpoints
(duo_unix 1.11 counts a JSON reply there as a server failure)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import bson
import orjson
from starlette.responses import Response

# A reply's content: strings, ints, and mappings and lists of them.
Value = object


class Encoding(Enum):
    """How one face of the API writes its replies."""

    JSON = "application/json"
    BSON = "application/bson"


def ok(encoding: Encoding, response: Value, status: int = 200) -> Response:
    """A successful reply carrying `response`."""
    return _reply(encoding, {"stat": "OK", "response": response}, status)


def fail(encoding: Encoding, status: int, code: int, message: str) -> Response:
    """A failure: an HTTP status and Duo's numeric code (e.g. 401 / 40103) and message."""
    return _reply(encoding, {"stat": "FAIL", "code": code, "message": message}, status)


def encode(encoding: Encoding, document: Mapping[str, object]) -> bytes:
    """The reply body. Strings lose any NUL: a BSON name cannot hold one, and the C clients
    read a string value only up to one."""
    clean = {str(k).replace("\x00", ""): _without_nul(v) for k, v in document.items()}
    if encoding is Encoding.BSON:
        return bson.encode(clean)
    return orjson.dumps(clean)


def _reply(encoding: Encoding, document: Mapping[str, object], status: int) -> Response:
    return Response(encode(encoding, document), status_code=status, media_type=encoding.value)


def _without_nul(value: object) -> object:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, Mapping):
        return {str(k).replace("\x00", ""): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
