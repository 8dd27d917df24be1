"""Duo request signatures as the real clients make them: duo_client's own signing code is the
oracle for v2 and v5, and a request captured from Debian's login_duo 1.11.3 for v1."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
from urllib.parse import urlencode

import pytest
from duo_client.client import Client, normalize_params, sign

from app.duo.params import parse_json, parse_query
from app.duo.signatures import (
    DATE_WINDOW,
    SignatureRejected,
    SignedRequest,
    credentials,
    verify,
)

IKEY = "DIXYZV6YM8IFYVWBINCA"
SKEY = "yWHSMhWucAcp7qvuH3HWTaSaKABs8Gaddiv1NIRo"
HOST = "mfa.example.com"
NOW = 1_800_000_000.0
DATE = email.utils.formatdate(NOW)  # "…GMT" with usegmt=False gives "-0000", as duo_client


def _client_request(
    method: str,
    path: str,
    params: dict[str, str],
    *,
    sig_version: int,
    skey: str = SKEY,
    date: str = DATE,
    host: str = HOST,
    digestmod: object = hashlib.sha512,
    headers: dict[str, str] | None = None,
) -> tuple[SignedRequest, str]:
    """What duo_client 5.x sends for this call (built with its own functions), as the
    server receives it, and the hex signature from its Authorization header."""
    query, form, body = "", "", b""
    if sig_version == 5 and method == "POST":
        body = Client.canon_json(params).encode()
        authz = sign(IKEY, skey, method, host, path, date, 5, {}, body=body.decode(),
                     additional_headers=headers or {})  # fmt: skip
    elif sig_version == 5:
        query = urlencode(params)
        authz = sign(IKEY, skey, method, host, path, date, 5, normalize_params(params),
                     body="", additional_headers=headers or {})  # fmt: skip
    else:
        encoded = urlencode(params)
        query, form = ("", encoded) if method == "POST" else (encoded, "")
        body = form.encode()
        authz = sign(IKEY, skey, method, host, path, date, sig_version, normalize_params(params),
                     digestmod=digestmod)  # fmt: skip
    ikey, signature = credentials(authz)
    assert ikey == IKEY
    request = SignedRequest(
        method=method,
        host=HOST,
        path=path,
        query=parse_query(query),
        form=parse_query(form),
        body=body,
        date=date,
        duo_headers={k.lower(): v for k, v in (headers or {}).items()},
    )
    return request, signature


PARAMS = {"username": "alice", "factor": "push", "pushinfo": "from=login&x=ä ~*'", "async": "1"}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("version", [2, 5])
def test_duo_client_signatures_verify(method: str, version: int) -> None:
    request, signature = _client_request(method, "/auth/v2/auth", PARAMS, sig_version=version)
    assert verify(request, SKEY, signature, legacy=False, now=NOW) == version


def test_a_v2_signature_made_with_sha1_verifies() -> None:
    # Older clients (and duo_client with digestmod=sha1) sign v2 with HMAC-SHA1.
    request, signature = _client_request(
        "POST", "/auth/v2/preauth", PARAMS, sig_version=2, digestmod=hashlib.sha1
    )
    assert len(signature) == 40
    assert verify(request, SKEY, signature, legacy=False, now=NOW) == 2


def test_a_duo_api_golang_request_verifies() -> None:
    # duo_api_golang (Authelia's client) sends POST parameters in the query, not the body,
    # and signs v2 with HMAC-SHA1 over them (spaces as %20).
    params = {"username": "alice", "factor": "push", "pushinfo": "target url=https://x"}
    authz = sign(IKEY, SKEY, "POST", HOST, "/auth/v2/auth", DATE, 2,
                 normalize_params(params), digestmod=hashlib.sha1)  # fmt: skip
    _, signature = credentials(authz)
    query = urlencode(params).replace("+", "%20")
    request = SignedRequest("POST", HOST, "/auth/v2/auth", parse_query(query), [], b"",
                            DATE, {})  # fmt: skip
    assert verify(request, SKEY, signature, legacy=False, now=NOW) == 2


def test_x_duo_headers_are_signed_in_v5() -> None:
    headers = {"X-Duo-Trace": "abc"}
    request, signature = _client_request("GET", "/auth/v2/check", {}, sig_version=5,
                                         headers=headers)  # fmt: skip
    assert verify(request, SKEY, signature, legacy=False, now=NOW) == 5
    changed = SignedRequest(**{**request.__dict__, "duo_headers": {"x-duo-trace": "abd"}})
    with pytest.raises(SignatureRejected):
        verify(changed, SKEY, signature, legacy=False, now=NOW)


def test_login_duo_1_11_3_v1_signature_verifies() -> None:
    # Captured from `login_duo -f alice echo OK` (Debian 12) against host localhost:18443.
    body = (
        b"async=0&auto=push1&factor=auto&hostname=vm&pushinfo=Server%2BIP%3D192.0.2.2"
        b"%26Command%3Decho%2520OK&user=alice"
    )
    authz = (
        "Basic RElYWVpWNllNOElGWVZXQklOQ0E6"
        "NTYwMjYwY2FiN2NkY2FmNjI3ODVmM2Y5ZTFiNWZkNTIzM2RmYTA4Ng=="
    )
    ikey, signature = credentials(authz)
    request = SignedRequest("POST", "localhost", "/rest/v1/auth.bson", [], parse_query(body),
                            body, None, {})  # fmt: skip
    assert ikey == IKEY
    assert verify(request, SKEY, signature, legacy=True, now=NOW) == 1
    # The host signed is the host name alone: with the port it does not verify.
    with_port = SignedRequest(**{**request.__dict__, "host": "localhost:18443"})
    with pytest.raises(SignatureRejected):
        verify(with_port, SKEY, signature, legacy=True, now=NOW)


def test_a_v1_signature_is_refused_on_auth_v2_and_v2_on_the_legacy_endpoints() -> None:
    request, signature = _client_request("POST", "/auth/v2/auth", PARAMS, sig_version=1)
    with pytest.raises(SignatureRejected):
        verify(request, SKEY, signature, legacy=False, now=NOW)
    request, signature = _client_request("POST", "/rest/v1/auth.bson", PARAMS, sig_version=2)
    with pytest.raises(SignatureRejected):
        verify(request, SKEY, signature, legacy=True, now=NOW)


def test_a_wrong_skey_or_host_is_refused() -> None:
    request, signature = _client_request("POST", "/auth/v2/auth", PARAMS, sig_version=5,
                                         skey="x" * 40)  # fmt: skip
    with pytest.raises(SignatureRejected) as refused:
        verify(request, SKEY, signature, legacy=False, now=NOW)
    assert refused.value.code == 40103
    request, signature = _client_request("POST", "/auth/v2/auth", PARAMS, sig_version=5,
                                         host="evil.example")  # fmt: skip
    with pytest.raises(SignatureRejected):
        verify(request, SKEY, signature, legacy=False, now=NOW)


@pytest.mark.parametrize("version", [2, 5])
def test_a_changed_parameter_or_body_is_refused(version: int) -> None:
    request, signature = _client_request("POST", "/auth/v2/auth", PARAMS, sig_version=version)
    if version == 5:
        body = json.loads(request.body) | {"username": "mallory"}
        changed = SignedRequest(**{**request.__dict__, "body": Client.canon_json(body).encode()})
        assert parse_json(changed.body) != parse_json(request.body)
    else:
        form = [(k, "mallory" if k == "username" else v) for k, v in request.form]
        changed = SignedRequest(**{**request.__dict__, "form": form})
    with pytest.raises(SignatureRejected):
        verify(changed, SKEY, signature, legacy=False, now=NOW)


@pytest.mark.parametrize("skew", [-DATE_WINDOW - 1, DATE_WINDOW + 1, -86400, 86400 * 365])
def test_a_date_outside_the_window_is_refused(skew: float) -> None:
    date = email.utils.formatdate(NOW + skew)
    request, signature = _client_request("GET", "/auth/v2/check", {}, sig_version=5, date=date)
    with pytest.raises(SignatureRejected) as refused:
        verify(request, SKEY, signature, legacy=False, now=NOW)
    assert refused.value.code == 40105


@pytest.mark.parametrize("skew", [-DATE_WINDOW + 1, 0, DATE_WINDOW - 1])
def test_a_date_inside_the_window_is_accepted(skew: float) -> None:
    date = email.utils.formatdate(NOW + skew, usegmt=True)
    request, signature = _client_request("GET", "/auth/v2/check", {}, sig_version=5, date=date)
    assert verify(request, SKEY, signature, legacy=False, now=NOW) == 5


@pytest.mark.parametrize("date", ["", "yesterday", "Mon, 99 Foo 2026 99:99:99 +0000", "1" * 200])
def test_a_missing_or_unreadable_date_is_refused(date: str) -> None:
    request, signature = _client_request("GET", "/auth/v2/check", {}, sig_version=5, date=date)
    with pytest.raises(SignatureRejected) as refused:
        verify(request, SKEY, signature, legacy=False, now=NOW)
    assert refused.value.code == 40105


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b":sig").decode(),
        "Basic " + base64.b64encode(b"ikey:").decode(),
        "Basic " + base64.b64encode("ïkey:sig".encode()).decode(),
        "Basic " + "A" * 2000,
    ],
)
def test_unreadable_credentials_are_40101(header: str | None) -> None:
    with pytest.raises(SignatureRejected) as refused:
        credentials(header)
    assert refused.value.code == 40101


@pytest.mark.parametrize("signature", ["", "0" * 39, "0" * 64, "z" * 128, "é" * 128])
def test_a_signature_of_no_known_length_or_alphabet_is_refused(signature: str) -> None:
    request, _ = _client_request("GET", "/auth/v2/check", {}, sig_version=5)
    with pytest.raises(SignatureRejected):
        verify(request, SKEY, signature, legacy=False, now=NOW)
