"""`GET /openapi.json` against the running app: a valid OpenAPI 3.1 document that lists every
HTTP route, and only routes that exist, with the body models the handlers parse and the
answer models they return; and real answers of a live server, along the journeys of
docs/protocol.md, checked against the schemas it documents for their status.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.routing import Route, WebSocketRoute

from app.core.signatures import device_public_jwk
from app.db.accounts import create_api_key
from app.db.models import User
from app.main import all_routes
from app.verification import issue_verification
from app.web.contract import Operation, declared_operation
from tests.fakes.authenticator import SoftAuthenticator
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.app import PASSWORD, LiveServer, Phone, ServerFactory
from tests.integration.test_push_delivery import providers_for
from tests.integration.test_sms_fallback import code_in, texts

pytestmark = pytest.mark.timeout(90)

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def route_table(server: LiveServer) -> tuple[set[tuple[str, str]], set[str]]:
    """(METHOD, /path/{param}) of every HTTP route the app serves, and its WebSocket paths."""
    http: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for route in server.app.routes:
        if isinstance(route, WebSocketRoute):
            sockets.add(_PARAM.sub(r"{\1}", route.path))
        elif isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    http.add((method, _PARAM.sub(r"{\1}", route.path)))
    return http, sockets


def declarations() -> Iterator[tuple[str, str, Operation | None]]:
    """(METHOD, path, what its handler declared) of every HTTP route of the app."""
    for route in all_routes():
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    path = _PARAM.sub(r"{\1}", route.path)
                    yield method, path, declared_operation(route.endpoint)


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


async def openapi(server: LiveServer) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    found: dict[str, Any] = response.json()
    return found


async def test_the_document_is_valid_openapi_3_1(server: LiveServer) -> None:
    doc = await openapi(server)

    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": server.settings.public_url}]
    assert "docs/protocol.md" in doc["info"]["description"]
    validate(doc)  # raises with the offending location if it is not valid


async def test_every_route_is_documented_and_every_documented_route_exists(
    server: LiveServer,
) -> None:
    doc = await openapi(server)
    http, sockets = route_table(server)

    assert documented(doc) == http
    assert set(doc["x-websockets"]) == sockets
    undeclared = sorted((method, path) for method, path, spec in declarations() if spec is None)
    assert not undeclared, f"declare these handlers' answers with @answers(...): {undeclared}"


async def test_every_documented_call_is_answered_by_its_route_with_a_documented_status(
    server: LiveServer,
) -> None:
    doc = await openapi(server)
    browser = server.browser()

    for path, item in doc["paths"].items():
        for method, operation in item.items():
            url = _PARAM.sub("0123456789abcdef0123456789abcdef", path)
            body = {} if "requestBody" in operation else None
            response = await browser.request(method.upper(), url, json=body)
            where = f"{method.upper()} {path} -> {response.status_code} {response.text[:200]}"

            assert response.status_code != 405, where
            if response.status_code == 404 and response.headers.get("content-type", "").startswith(
                "application/json"
            ):
                assert not response.json()["message"].startswith("no such route"), where
            assert str(response.status_code) in operation["responses"], where


async def test_request_bodies_are_the_models_the_handlers_parse(server: LiveServer) -> None:
    doc = await openapi(server)
    schemas = doc["components"]["schemas"]

    for method, path, spec in declarations():
        assert spec is not None
        operation = doc["paths"][path][method.lower()]
        if spec.body is None:
            assert "requestBody" not in operation, (method, path)
            continue
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[-1]
        assert name == spec.body.__name__
        assert set(schemas[name]["properties"]) == set(spec.body.model_fields), name

    login = schemas["LoginBody"]
    assert set(login["required"]) == {"email", "password"}
    assert login["properties"]["remember_browser"]["type"] == "boolean"
    enroll = schemas["EnrollBody"]
    assert enroll["properties"]["platform"]["enum"] == ["android", "ios", "web"]
    answers = doc["paths"]["/api/login"]["post"]["responses"]
    assert {"200", "202", "401", "403", "422", "423", "429", "503"} <= set(answers)


async def test_answer_schemas_say_which_members_are_absent_and_which_are_null(
    server: LiveServer,
) -> None:
    schemas = (await openapi(server))["components"]["schemas"]

    status = schemas["RpApprovalStatus"]
    assert "decided_at" not in status["required"], "absent until the approval ends"
    assert status["properties"]["decided_at"] == {
        "format": "date-time",
        "title": "Decided At",
        "type": "string",
    }
    assert "reason" in status["required"], "null while pending, never absent"
    assert {"type": "null"} in status["properties"]["reason"]["anyOf"]
    assert "number_choices" not in schemas["Approval"]["required"]
    assert "details" not in schemas["ApprovalContext"]["required"]
    assert "additionalProperties" not in schemas["Approval"], "the contract may add members"


# --- real answers against the documented schemas --------------------------------------------


@dataclass
class Seen:
    method: str
    url_path: str
    status: int
    content_type: str
    body: Any


class Recorder:
    """Every answer the test's clients get, for checking against the document afterwards."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        content_type = response.headers.get("content-type", "")
        body = response.json() if content_type.startswith("application/json") else None
        self.seen.append(
            Seen(
                response.request.method,
                response.request.url.path,
                response.status_code,
                content_type,
                body,
            )
        )

    def client(
        self, server: LiveServer, headers: dict[str, str] | None = None
    ) -> httpx.AsyncClient:
        client = server.browser(event_hooks={"response": [self]})
        client.headers.update(headers or {})
        return client


def _strict(schemas: dict[str, Any]) -> dict[str, Any]:
    """The schemas with every described object closed: a real answer must not carry a member
    the document does not name."""
    closed = copy.deepcopy(schemas)
    stack: list[Any] = [closed]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return closed


def _template(routes: set[tuple[str, str]], method: str, path: str) -> str | None:
    """The route template (`/api/login/{approval_id}`) a request path was served by."""
    candidates = sorted(
        (template for m, template in routes if m == method),
        key=lambda template: template.count("{"),  # literal paths win (login/recovery)
    )
    for template in candidates:
        if re.fullmatch(_PARAM.sub("[^/]+", template), path):
            return template
    return None


async def _new_token(server: LiveServer) -> str:
    """A fresh verification token of a new unverified user, as its mail would carry it."""
    user_id = await server.add_user("unverified@example.com", verified=False)
    async with server.services.db() as db:
        user = await db.get(User, user_id)
        assert user is not None
        message = await issue_verification(db, user, settings=server.settings, now=time.time())
        await db.commit()
        token: str = orjson.loads(message.payload)["token"]
    return token


async def _journeys(server: LiveServer, record: Recorder, fake_twilio: FakeTwilio) -> None:
    """The calls of docs/protocol.md's journeys, each answer recorded."""
    anonymous = record.client(server)
    for path in ("/healthz", "/readyz", "/api/webpush/key", "/api/no-such-route"):
        await anonymous.get(path)
    await anonymous.post("/api/register", json={"email": "new@example.com", "password": PASSWORD})
    await anonymous.post("/api/register", json={"email": "bad", "password": PASSWORD})
    await anonymous.post("/api/verify-email", json={"token": "not-a-token"})
    await anonymous.post("/api/verify-email", json={"token": await _new_token(server)})
    await anonymous.post("/api/verify-email/resend", json={"email": "new@example.com"})
    await anonymous.get("/api/account")

    # A first device, enrolled by a restricted session.
    user_id = await server.add_user("alice@example.com")
    first = record.client(server)
    assert (await server.login(first, "alice@example.com")).status_code == 200
    await first.get("/api/account")
    code = (await first.post("/api/devices/enrollments")).json()["code"]
    key = ec.generate_private_key(ec.SECP256R1())
    enrolled = await anonymous.post(
        "/api/devices",
        json={
            "code": code,
            "name": "Pixel",
            "platform": "android",
            "public_key": device_public_jwk(key.public_key()),
        },
    )
    data = enrolled.json()
    phone = Phone(data["device_id"], data["device_token"], key, data["passcode"]["secret"])
    device = record.client(server, headers={"Authorization": f"Bearer {phone.token}"})
    await device.patch("/api/devices/me", json={"name": "Pixel 9"})

    # A sign-in approved on the phone, remembered.
    browser = record.client(server)
    started = (await server.login(browser, "alice@example.com", remember_browser=True)).json()
    approval_id = started["approval_id"]
    await browser.get(f"/api/login/{approval_id}")
    await browser.post(f"/api/login/{approval_id}/resend")
    await browser.post(f"/api/login/{approval_id}/complete")  # 409 not_approved
    await device.get("/api/devices/me/approvals")
    approval = (await device.get(f"/api/approvals/{approval_id}")).json()
    jws = phone.sign(approval, number=started["number"])
    await device.post(f"/api/approvals/{approval_id}/decision", json={"jws": jws})
    await device.post(f"/api/approvals/{approval_id}/decision", json={"jws": jws})  # 409
    await browser.get(f"/api/login/{approval_id}")
    await browser.post(f"/api/login/{approval_id}/complete")
    await browser.post(f"/api/login/{approval_id}/complete")  # 409 already_completed

    # The account of a full session.
    await browser.get("/api/account")
    await browser.patch("/api/account", json={"sms_fallback": True})
    await browser.get("/api/devices")
    await server.audit_filed()
    await browser.get("/api/account/activity")
    codes = (await browser.post("/api/account/recovery-codes")).json()["codes"]
    await browser.post("/api/account/phone", json={"phone": "+14155552671"})
    [text] = await texts(fake_twilio, 1)
    right = code_in(text["Body"])
    wrong = "111111" if right == "000000" else "000000"
    await browser.post("/api/account/phone/verify", json={"code": wrong})
    await browser.post("/api/account/phone/verify", json={"code": right})

    # Passkeys.
    authenticator = SoftAuthenticator(server.origin)
    options = (await browser.post("/api/account/passkeys/options")).json()["publicKey"]
    added = await browser.post(
        "/api/account/passkeys",
        json={"credential": authenticator.create(options), "name": "Laptop"},
    )
    passkey_id = added.json()["id"]
    await browser.patch(f"/api/account/passkeys/{passkey_id}", json={"name": "Desk"})
    elsewhere = record.client(server)
    sign_in = (await elsewhere.post("/api/login/passkey/options")).json()["publicKey"]
    await elsewhere.post("/api/login/passkey", json={"credential": authenticator.get(sign_in)})
    await browser.delete(f"/api/account/passkeys/{passkey_id}")

    # A sign-in approved with a passcode, one with an SMS code, one denied by a wrong code.
    other = record.client(server)
    started = (await server.login(other, "alice@example.com")).json()
    await other.post(
        f"/api/login/{started['approval_id']}/passcode",
        json={"code": phone.passcode(time.time())},
    )
    sms = record.client(server)
    started = (await server.login(sms, "alice@example.com")).json()
    sms_url = f"/api/login/{started['approval_id']}"
    before = len(fake_twilio.requests)
    await sms.post(f"{sms_url}/sms")
    # The newest text holds the code (an automatic fallback text may land meanwhile).
    for _ in range(3):
        newest = (await texts(fake_twilio, before + 1))[-1]
        entered = await sms.post(f"{sms_url}/code", json={"code": code_in(newest["Body"])})
        if entered.status_code == 200:
            break
    await sms.post(f"{sms_url}/code", json={"code": "123456"})  # 409: it is approved

    # A recovery code, a trusted browser forgotten, signing out.
    recovering = record.client(server)
    await recovering.post(
        "/api/login/recovery",
        json={"email": "alice@example.com", "password": PASSWORD, "code": codes[0]},
    )
    account = (await browser.get("/api/account")).json()
    for trusted in account["trusted_browsers"]:
        await browser.delete(f"/api/account/trusted-browsers/{trusted['id']}")

    # A relying party: pending, then denied on the phone, then too late for a passcode.
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "VPN", now=time.time())
        await db.commit()
    rp = record.client(server, headers={"Authorization": f"Bearer {api_key}"})
    await rp.post("/api/v1/approvals", json={"user": "nobody@example.com"})
    created = (
        await rp.post("/api/v1/approvals", json={"user": "alice@example.com", "ttl": 60})
    ).json()
    rp_id = created["approval_id"]
    await rp.post(
        f"/api/v1/approvals/{rp_id}/passcode",
        json={"passcode": phone.passcode(time.time() + 30)},  # a step the sign-in did not use
    )
    created = (
        await rp.post("/api/v1/approvals", json={"user": "alice@example.com", "ttl": 60})
    ).json()
    rp_id = created["approval_id"]
    await rp.get(f"/api/v1/approvals/{rp_id}")
    rp_approval = (await device.get(f"/api/approvals/{rp_id}")).json()
    denial = phone.sign(rp_approval, decision="deny")
    await device.post(f"/api/approvals/{rp_id}/decision", json={"jws": denial})
    await rp.get(f"/api/v1/approvals/{rp_id}?wait=1")
    await rp.post(f"/api/v1/approvals/{rp_id}/passcode", json={"passcode": "123456"})

    # The owner revokes a second phone; the first one leaves by itself; pages.
    second = await server.enroll_phone(user_id, name="Old phone")
    await browser.delete(f"/api/devices/{second.device_id}")
    await device.delete("/api/devices/me")
    await browser.post("/api/logout")
    for page in ("/", "/phone", "/phone/sw.js", "/verify-email?token=x"):
        await anonymous.get(page)


# Routes whose 2xx answer the journeys do not reach, and why (none today).
NOT_REACHED: dict[tuple[str, str], str] = {}


async def test_real_answers_match_the_documented_schemas(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    record = Recorder()
    await _journeys(server, record, fake_twilio)
    doc = await openapi(server)
    http, _ = route_table(server)
    schemas = _strict(doc["components"]["schemas"])

    succeeded: set[tuple[str, str]] = set()
    checked = 0
    for seen in record.seen:
        template = _template(http, seen.method, seen.url_path)
        where = f"{seen.method} {seen.url_path} -> {seen.status} {seen.body}"
        if template is None:
            assert seen.status == 404, where  # the unknown route
            schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
        else:
            responses = doc["paths"][template][seen.method.lower()]["responses"]
            assert str(seen.status) in responses, f"undocumented status: {where}"
            content = responses[str(seen.status)].get("content", {})
            if seen.body is None:
                assert "application/json" not in content, f"documented as JSON: {where}"
                continue
            schema = content["application/json"]["schema"]
            if 200 <= seen.status < 300:
                succeeded.add((seen.method, template))
        validator = Draft202012Validator({**schema, "components": {"schemas": schemas}})
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(seen.body)]
        assert not errors, f"{where}\n" + "\n".join(errors)
        checked += 1

    json_routes = {
        (method, path)
        for method, path, spec in declarations()
        if spec is not None
        and any(
            getattr(reply, "model", None) is not None and 200 <= status < 300
            for status, reply in spec.replies.items()
        )
    }
    missed = json_routes - succeeded - set(NOT_REACHED)
    assert not missed, f"no 2xx answer of these routes was checked: {sorted(missed)}"
    assert checked > 60
