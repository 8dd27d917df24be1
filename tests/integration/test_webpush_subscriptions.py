"""A device's Web Push subscription through the API (PATCH /api/devices/me, POST
/api/devices): stored with its auth secret sealed, replaced and removed by the device only,
gone with the device; hostile input refused by field, endpoints checked against the SSRF
policy as they are registered."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.db.models import Device
from tests.fixtures.app import LiveServer, Phone
from tests.integration.test_audit_stream import signed_in_with_approval
from tests.integration.test_push_delivery import push_token

FCM = "https://fcm.googleapis.com/fcm/send/"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def browser_keys() -> dict[str, str]:
    """`keys` as PushSubscription.toJSON() gives them: a P-256 point and a 16-byte secret."""
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return {"p256dh": b64url(point), "auth": b64url(secrets.token_bytes(16))}


def subscription(endpoint: str | None = None, **keys: Any) -> dict[str, Any]:
    return {
        "endpoint": endpoint or FCM + secrets.token_urlsafe(40),
        "expirationTime": None,
        "keys": {**browser_keys(), **keys},
    }


async def patch_me(server: LiveServer, phone: Phone | None, body: Any) -> httpx.Response:
    headers = phone.auth if phone else {}
    async with httpx.AsyncClient(base_url=server.url) as client:
        return await client.patch("/api/devices/me", json=body, headers=headers)


def webpush(sub: dict[str, Any]) -> dict[str, Any]:
    return {"push": {"provider": "webpush", "subscription": sub}}


async def test_a_subscription_is_stored_with_its_auth_secret_sealed_and_can_be_removed(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("sub@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    sub = subscription()

    answer = await patch_me(server, phone, webpush(sub))
    assert answer.status_code == 200, answer.text
    assert answer.json()["push"] == "webpush"
    token = await push_token(server, phone.device_id)
    assert token is not None
    stored = orjson.loads(token)
    assert stored["endpoint"] == sub["endpoint"]
    assert stored["p256dh"] == sub["keys"]["p256dh"]
    auth = sub["keys"]["auth"]
    assert auth not in token and base64.urlsafe_b64decode(auth + "==").hex() not in token
    assert stored["auth"].startswith("v1.")

    # A rename leaves it; a new one replaces it; `"push": null` removes it.
    assert (await patch_me(server, phone, {"name": "Renamed"})).json()["push"] == "webpush"
    newer = subscription()
    assert (await patch_me(server, phone, webpush(newer))).status_code == 200
    assert orjson.loads(await push_token(server, phone.device_id) or "")["endpoint"] == (
        newer["endpoint"]
    )
    removed = await patch_me(server, phone, {"push": None})
    assert removed.status_code == 200 and removed.json()["push"] is None
    async with server.services.db() as db:
        device = await db.get(Device, phone.device_id)
        assert device is not None and device.push_token is None and device.push_provider is None


async def test_a_phone_may_enroll_with_its_subscription(server: LiveServer) -> None:
    user_id = await server.add_user("enroll-sub@example.com")
    sub = subscription()
    phone = await server.enroll_phone(
        user_id, platform="web", push={"provider": "webpush", "subscription": sub}
    )
    token = await push_token(server, phone.device_id)
    assert token is not None and orjson.loads(token)["endpoint"] == sub["endpoint"]


BAD_BODIES: list[tuple[Any, str]] = [
    (webpush({"keys": browser_keys()}), "push.webpush.subscription.endpoint"),
    (webpush({"endpoint": FCM + "x"}), "push.webpush.subscription.keys"),
    (webpush(subscription(p256dh="A" * 87)), "keys.p256dh"),  # 65 zero-ish bytes, not 0x04
    (webpush(subscription(p256dh="BA" + "A" * 85)), "keys.p256dh: not a point on P-256"),
    (webpush(subscription(p256dh=browser_keys()["p256dh"][:-1] + "!")), "keys.p256dh"),
    (webpush(subscription(p256dh=b64url(b"\x04" + b"\x01" * 60))), "keys.p256dh"),
    (webpush(subscription(auth=b64url(b"x" * 15))), "keys.auth"),
    (webpush(subscription(auth=b64url(b"x" * 17))), "keys.auth"),
    (webpush(subscription(auth="+/+/+/+/+/+/+/+/+/+/+/")), "keys.auth"),
    (webpush(subscription(auth=12345)), "keys.auth"),
    (webpush({**subscription(), "endpoint": ["https://fcm.googleapis.com/x"]}), "endpoint"),
    ({"push": {"provider": "webpush", "token": "x"}}, "push.webpush.subscription"),
    ({"push": {"provider": "gcm", "token": "x"}}, "push"),
    ({"push": {"provider": "webpush", "subscription": "https://fcm.googleapis.com/x"}}, "push"),
    ({"push": "webpush"}, "push"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
async def test_a_malformed_subscription_is_refused_naming_the_field(
    server: LiveServer, body: Any, field: str
) -> None:
    user_id = await server.add_user("bad@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    answer = await patch_me(server, phone, body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert field in answer.json()["message"]
    assert await push_token(server, phone.device_id) is None


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://fcm.googleapis.com/fcm/send/x", "only https"),
        ("https://push.attacker.example/x", "not an allowed push service"),
        ("https://10.0.0.7/x", "IP address"),
        ("https://169.254.169.254/latest/meta-data/", "IP address"),
        ("https://[::1]/x", "IP address"),
        ("http://127.0.0.1:6379/x", "IP address"),  # not a test service without test mode
        ("https://fcm.googleapis.com@10.0.0.7/x", "user information"),
        ("https://fcm.googleapis.com:8443/x", "port 443"),
        (FCM + "x" * 2100, "endpoint"),
    ],
)
async def test_an_endpoint_outside_the_policy_is_refused_when_registered(
    server: LiveServer, endpoint: str, reason: str
) -> None:
    user_id = await server.add_user("ssrf@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    answer = await patch_me(server, phone, webpush(subscription(endpoint)))
    assert answer.status_code == 422, answer.text
    assert reason in answer.json()["message"]
    assert await push_token(server, phone.device_id) is None


async def test_an_oversized_body_is_refused_before_it_is_read(server: LiveServer) -> None:
    user_id = await server.add_user("big@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    answer = await patch_me(server, phone, webpush(subscription(FCM + "x" * 70_000)))
    assert answer.status_code == 413 and answer.json()["error"] == "too_large"


async def test_only_the_device_itself_may_change_its_subscription(server: LiveServer) -> None:
    user_id = await server.add_user("auth@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    sub = subscription()
    assert (await patch_me(server, None, webpush(sub))).status_code == 401
    stranger = Phone(phone.device_id, "not-the-token", phone.key)
    assert (await patch_me(server, stranger, webpush(sub))).status_code == 401
    assert await push_token(server, phone.device_id) is None


async def test_another_device_cannot_take_or_remove_a_subscription(server: LiveServer) -> None:
    owner = await server.enroll_phone(await server.add_user("owner@example.com"), platform="web")
    other = await server.enroll_phone(await server.add_user("other@example.com"), platform="web")
    sub = subscription()
    assert (await patch_me(server, owner, webpush(sub))).status_code == 200
    held = await push_token(server, owner.device_id)

    # The same endpoint from another device (any user's) is refused, with other keys too.
    taken = await patch_me(server, other, webpush({**subscription(), "endpoint": sub["endpoint"]}))
    assert taken.status_code == 409 and taken.json()["error"] == "push_in_use"
    # Removing "its" subscription only ever touches the caller's own device.
    assert (await patch_me(server, other, {"push": None})).status_code == 200
    assert await push_token(server, owner.device_id) == held
    assert await push_token(server, other.device_id) is None
    # An endpoint that only shares a prefix with the held one is another endpoint.
    assert (
        await patch_me(server, other, webpush(subscription(sub["endpoint"][:-1] + "%")))
    ).status_code == 200


async def test_unenrolling_or_revoking_the_device_deletes_its_subscription(
    server: LiveServer,
) -> None:
    browser, owner_phone, _ = await signed_in_with_approval(server, "revoke@example.com")
    assert (await patch_me(server, owner_phone, webpush(subscription()))).status_code == 200
    revoked = await browser.delete(f"/api/devices/{owner_phone.device_id}")
    assert revoked.status_code == 200
    assert await push_token(server, owner_phone.device_id) is None

    user_id = await server.add_user("unenroll@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    sub = subscription()
    assert (await patch_me(server, phone, webpush(sub))).status_code == 200
    async with httpx.AsyncClient(base_url=server.url) as client:
        gone = await client.delete("/api/devices/me", headers=phone.auth)
    assert gone.status_code == 200
    assert await push_token(server, phone.device_id) is None
    # A revoked device's token no longer works, and its endpoint is free for a new device.
    assert (await patch_me(server, phone, webpush(sub))).status_code == 401
    again = await server.enroll_phone(user_id, platform="web")
    assert (await patch_me(server, again, webpush(sub))).status_code == 200


async def test_the_enrollment_answer_has_a_link_and_qr_code_for_the_phone_page(
    server: LiveServer,
) -> None:
    browser, _, _ = await signed_in_with_approval(server, "qr@example.com")
    answer = await browser.post("/api/devices/enrollments")
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["phone_url"] == f"{server.url}/phone#enroll={body['code']}"
    assert body["phone_qr_svg"].startswith("<svg") and body["phone_qr_svg"] != body["qr_svg"]
