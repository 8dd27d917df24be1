"""Duo request signatures: the canonical strings real clients sign and the HMAC check (pure).

`Authorization: Basic base64(ikey:hex(HMAC(skey, canon)))`, where canon is, line by line:
- v1 (the legacy `/rest/v1/*.bson` endpoints, duo_unix 1.11): METHOD, host, path, params;
  HMAC-SHA1, no Date, so a captured request stays valid: TLS is what protects it.
- v2: Date, METHOD, host, path, params (form bodies); HMAC-SHA1 or -SHA512.
- v5 (duo_client's default): Date, METHOD, host, path, query params, SHA-512 hex of the body,
  SHA-512 hex of the `X-Duo-*` headers; HMAC-SHA512.
`params` are `quote(k,'~')=quote(v,'~')` sorted and joined by `&`; `host` is the server's
own host name (lower case, no port), never the request's Host header. v2 and v5 need a
`Date` within `DATE_WINDOW` seconds of the server's clock.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

# How far a request's Date may be from the server's clock, either way.
DATE_WINDOW = 300

Digest = Callable[[], "hashlib._Hash"]
# The digest follows from the length of the hex signature a client sent.
_DIGESTS: dict[int, Digest] = {40: hashlib.sha1, 128: hashlib.sha512}

Params = list[tuple[str, str]]


class SignatureRejected(Exception):
    """A request whose credentials do not check out; `code` is Duo's (401xx)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SignedRequest:
    """What a signature covers, as the server received it."""

    method: str
    host: str  # the server's own API host name
    path: str
    query: Params  # from the URL
    form: Params  # from a form body ([] for JSON or none)
    body: bytes
    date: str | None
    duo_headers: Mapping[str, str]  # X-Duo-* headers, names in lower case


def credentials(authorization: str | None) -> tuple[str, str]:
    """The ikey and hex signature of a `Basic` Authorization header; 40101 if unreadable."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic" or not encoded.strip() or len(encoded) > 1024:
        raise SignatureRejected(40101, "Missing request credentials")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise SignatureRejected(40101, "Missing request credentials") from None
    ikey, colon, signature = decoded.partition(":")
    if not colon or not ikey or not signature:
        raise SignatureRejected(40101, "Missing request credentials")
    return ikey, signature


def canon_params(params: Iterable[tuple[str, str]]) -> str:
    """The canonical parameter string: quoted names and values, sorted, joined by `&`."""
    quoted = sorted((quote(key, "~"), quote(value, "~")) for key, value in params)
    return "&".join(f"{key}={value}" for key, value in quoted)


def canonical_v1(request: SignedRequest) -> str:
    return "\n".join(
        [request.method.upper(), request.host, request.path, canon_params(_params(request))]
    )


def canonical_v2(request: SignedRequest) -> str:
    return "\n".join([request.date or "", canonical_v1(request)])


def canonical_v5(request: SignedRequest) -> str:
    return "\n".join(
        [
            request.date or "",
            request.method.upper(),
            request.host,
            request.path,
            canon_params(request.query),
            hashlib.sha512(request.body).hexdigest(),
            duo_headers_hash(request.duo_headers),
        ]
    )


def duo_headers_hash(headers: Mapping[str, str]) -> str:
    """SHA-512 hex of the `X-Duo-*` headers: lower-case names sorted, names and values
    joined by NUL (of "" when there are none)."""
    canon = "\x00".join(part for name in sorted(headers) for part in (name, headers[name]))
    return hashlib.sha512(canon.encode("utf-8")).hexdigest()


def _params(request: SignedRequest) -> Params:
    # v1 and v2 sign the form body's parameters, or the query's when there is no form.
    return request.form if request.form else request.query


def sign(skey: str, canon: str, digest: Digest = hashlib.sha512) -> str:
    """The hex HMAC of a canonical string (what a client sends after `ikey:`)."""
    return hmac.new(skey.encode("utf-8"), canon.encode("utf-8"), digest).hexdigest()


def check_date(date: str | None, now: float) -> None:
    """40105 unless `date` (RFC 2822) is within DATE_WINDOW seconds of `now`. A date without
    a zone counts as UTC, as `-0000` (what duo_client sends) means."""
    parsed = email.utils.parsedate_tz(date) if date and len(date) < 100 else None
    if parsed is None:
        raise SignatureRejected(40105, "Missing or invalid Date header")
    try:
        when = email.utils.mktime_tz(parsed)
    except (OverflowError, ValueError):
        raise SignatureRejected(40105, "Missing or invalid Date header") from None
    if abs(when - now) > DATE_WINDOW:
        raise SignatureRejected(40105, "Request date is too far from the server's clock")


def verify(request: SignedRequest, skey: str, signature: str, *, legacy: bool, now: float) -> int:
    """The signature version that `signature` is a valid signature of, or SignatureRejected.

    `legacy` (the `/rest/v1` endpoints) accepts v1 only; the others need a fresh Date and
    accept v2 or v5.
    """
    digest = _DIGESTS.get(len(signature))
    if digest is None:
        raise SignatureRejected(40103, "Invalid signature in request credentials")
    candidates: list[tuple[int, str]]
    if legacy:
        candidates = [(1, canonical_v1(request))]
    else:
        check_date(request.date, now)
        candidates = [(2, canonical_v2(request))]
        if digest is hashlib.sha512:
            candidates.append((5, canonical_v5(request)))
    given = signature.lower().encode("ascii", "replace")
    matched = [
        version
        for version, canon in candidates
        # Every candidate is compared, in constant time, whatever the first gave.
        if hmac.compare_digest(sign(skey, canon, digest).encode("ascii"), given)
    ]
    if not matched:
        raise SignatureRejected(40103, "Invalid signature in request credentials")
    return matched[0]
