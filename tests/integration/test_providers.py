"""Provider adapters through the real pyfcm / aioapns / httpx clients against local fakes."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.core.clock import rfc3339
from app.core.tokens import new_id
from app.delivery.apns import ApnsSender
from app.delivery.fcm import FcmSender
from app.delivery.providers import build_providers
from app.delivery.push import PushMessage
from app.delivery.sms import LogSms, TwilioSms
from app.settings import Settings
from tests.fakes import Reply, run_in_thread
from tests.fakes import apns as apns_replies
from tests.fakes import fcm as fcm_replies
from tests.fakes import twilio as twilio_replies
from tests.fakes.apns import ApnsKey, FakeApns, ThrowawayCa
from tests.fakes.fcm import FCM_SCOPE, FakeFcm, ServiceAccount
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.providers import APNS_TOPIC, apns_env_for, settings_fields

TIMEOUT = 0.4


def settings(env: dict[str, str], tmp_path: Path) -> Settings:
    return Settings.model_validate({"data_dir": tmp_path, **settings_fields(env)})


def approval_request(lifetime: float = 90.4) -> tuple[PushMessage, float]:
    now = time.time()
    message = PushMessage(
        approval_id=new_id(),
        expires_at=now + lifetime,
        title="Sign-in request",
        body="Firefox on Linux from 203.0.113.7",
    )
    return message, now


# FCM


@pytest.fixture
def fcm_sender(fcm_env: dict[str, str], tmp_path: Path) -> FcmSender:
    return FcmSender.from_settings(settings(fcm_env, tmp_path), timeout=TIMEOUT)


async def test_fcm_sends_a_data_message_with_high_priority_and_the_remaining_life_as_ttl(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    message, now = approval_request(lifetime=90.4)

    result = await fcm_sender.send("fcm-token-1", message, now=now)

    assert result.outcome == "accepted"
    assert result.detail.startswith(f"projects/{fake_fcm.project_id}/messages/")
    assert result.latency > 0
    [request] = fake_fcm.requests
    assert request.path == f"/v1/projects/{fake_fcm.project_id}/messages:send"
    assert request.json["validate_only"] is False
    sent = request.message
    assert set(sent) == {"token", "data", "notification", "android"}
    assert sent["token"] == "fcm-token-1"
    assert sent["data"] == {
        "type": "approval_request",
        "approval_id": message.approval_id,
        "expires_at": rfc3339(message.expires_at),
    }
    assert sent["notification"] == {"title": message.title, "body": message.body}
    assert sent["android"] == {"priority": "HIGH", "ttl": "90s"}


async def test_fcm_gets_its_oauth_token_from_the_service_accounts_token_uri(
    fcm_sender: FcmSender, fake_fcm: FakeFcm, fcm_service_account: ServiceAccount
) -> None:
    message, now = approval_request()

    await fcm_sender.send("fcm-token-1", message, now=now)

    assert fake_fcm.token_requests, "no token request reached the service account's token_uri"
    grant = fake_fcm.token_requests[0]
    assert grant.form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = grant.claims(fcm_service_account.public_key_pem)
    assert claims["iss"] == fcm_service_account.client_email
    assert claims["scope"] == FCM_SCOPE
    assert fake_fcm.requests[0].authorization == f"Bearer {fake_fcm.issued_tokens[0]}"


async def test_fcm_project_id_setting_names_the_project(
    fcm_env: dict[str, str], fake_fcm: FakeFcm, tmp_path: Path
) -> None:
    env = {**fcm_env, "TAPPROVE_FCM_PROJECT_ID": "another-project"}
    sender = FcmSender.from_settings(settings(env, tmp_path), timeout=TIMEOUT)
    message, now = approval_request()

    assert (await sender.send("t", message, now=now)).outcome == "accepted"
    assert fake_fcm.requests[0].project == "another-project"


async def test_fcm_ttl_never_outlives_the_approval(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    message, now = approval_request(lifetime=5.99)

    await fcm_sender.send("t", message, now=now)

    assert fake_fcm.requests[0].message["android"]["ttl"] == "5s"


@pytest.mark.parametrize("lifetime", [-3.0, 0.0, 0.6])
async def test_fcm_does_not_send_an_expired_request(
    fcm_sender: FcmSender, fake_fcm: FakeFcm, lifetime: float
) -> None:
    message, now = approval_request(lifetime=lifetime)

    result = await fcm_sender.send("t", message, now=now)

    assert (result.outcome, result.detail) == ("failed", "expired")
    assert fake_fcm.requests == []


async def test_fcm_unregistered_token_is_invalid(fcm_sender: FcmSender, fake_fcm: FakeFcm) -> None:
    fake_fcm.reply(fcm_replies.unregistered())
    message, now = approval_request()

    result = await fcm_sender.send("gone", message, now=now)

    assert result.outcome == "invalid_token"


async def test_fcm_malformed_token_is_invalid(fcm_sender: FcmSender, fake_fcm: FakeFcm) -> None:
    fake_fcm.reply(fcm_replies.invalid_registration())
    message, now = approval_request()

    assert (await fcm_sender.send("junk", message, now=now)).outcome == "invalid_token"


async def test_fcm_bad_payload_fails_without_blaming_the_token(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    fake_fcm.reply(fcm_replies.invalid_argument())
    message, now = approval_request()

    assert (await fcm_sender.send("t", message, now=now)).outcome == "failed"


async def test_fcm_unavailable_is_retried_after_the_servers_retry_after(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    # An hour: a client that slept it out itself would never answer within the wait below.
    fake_fcm.reply(fcm_replies.unavailable(retry_after=3600))
    message, now = approval_request()

    result = await asyncio.wait_for(fcm_sender.send("t", message, now=now), 60)

    assert (result.outcome, result.retry_after) == ("retry", 3600.0)
    assert len(fake_fcm.requests) == 1, "no hidden retries inside the client"


async def test_fcm_quota_exceeded_is_retried(fcm_sender: FcmSender, fake_fcm: FakeFcm) -> None:
    fake_fcm.reply(fcm_replies.quota_exceeded(retry_after=10))
    message, now = approval_request()

    result = await fcm_sender.send("t", message, now=now)

    assert (result.outcome, result.retry_after) == ("retry", 10.0)


async def test_fcm_internal_error_is_retried_with_our_own_backoff(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    fake_fcm.reply(fcm_replies.internal())
    message, now = approval_request()

    result = await fcm_sender.send("t", message, now=now)

    assert (result.outcome, result.retry_after) == ("retry", None)


@pytest.mark.parametrize(
    "reply", [fcm_replies.unauthenticated(), fcm_replies.sender_id_mismatch()], ids=["401", "403"]
)
async def test_fcm_auth_errors_fail(fcm_sender: FcmSender, fake_fcm: FakeFcm, reply: Reply) -> None:
    fake_fcm.reply(reply)
    message, now = approval_request()

    assert (await fcm_sender.send("t", message, now=now)).outcome == "failed"


async def test_fcm_timeout_is_retried(fcm_sender: FcmSender, fake_fcm: FakeFcm) -> None:
    fake_fcm.reply(fcm_replies.slow(3.0))
    message, now = approval_request()

    result = await fcm_sender.send("t", message, now=now)

    assert (result.outcome, result.detail) == ("retry", "timeout")
    assert result.latency < 2.0


async def test_fcm_connection_refused_is_retried(
    fcm_env: dict[str, str], fake_fcm: FakeFcm, tmp_path: Path
) -> None:
    env = {**fcm_env, "TAPPROVE_FCM_ENDPOINT": "http://127.0.0.1:1/v1/projects"}
    sender = FcmSender.from_settings(settings(env, tmp_path), timeout=TIMEOUT)
    message, now = approval_request()

    result = await sender.send("t", message, now=now)

    assert result.outcome == "retry"
    assert result.detail.startswith("connection")


async def test_fcm_rejected_service_account_fails(fcm_sender: FcmSender, fake_fcm: FakeFcm) -> None:
    fake_fcm.token_replies.add(Reply(400, {"error": "invalid_grant"}))
    message, now = approval_request()

    result = await fcm_sender.send("t", message, now=now)

    assert result.outcome == "failed"
    assert result.detail.startswith("oauth")
    assert fake_fcm.requests == []


# APNs


@pytest.fixture
async def apns_sender(apns_env: dict[str, str], tmp_path: Path) -> AsyncIterator[ApnsSender]:
    sender = ApnsSender.from_settings(settings(apns_env, tmp_path), timeout=TIMEOUT)
    yield sender
    await sender.close()


async def test_apns_sends_an_alert_in_the_approval_category_and_no_secret(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    message, now = approval_request()

    result = await apns_sender.send("a1b2c3", message, now=now)

    assert result.outcome == "accepted"
    [request] = fake_apns.requests
    assert request.path == "/3/device/a1b2c3"
    assert request.payload == {
        "aps": {
            "alert": {"title": message.title, "body": message.body},
            "category": "TAPPROVE_APPROVAL",
            "sound": "default",
            "mutable-content": 1,
        },
        "type": "approval_request",
        "approval_id": message.approval_id,
        "expires_at": rfc3339(message.expires_at),
    }
    assert result.detail == request.headers["apns-id"]


async def test_apns_headers_carry_priority_expiry_collapse_id_and_topic(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    message, now = approval_request()

    await apns_sender.send("a1b2c3", message, now=now)

    headers = fake_apns.requests[0].headers
    assert headers[":method"] == "POST"
    assert headers["apns-priority"] == "10"
    assert headers["apns-expiration"] == str(math.floor(message.expires_at))
    assert headers["apns-collapse-id"] == message.approval_id
    assert headers["apns-topic"] == APNS_TOPIC
    assert headers["apns-push-type"] == "alert"


async def test_apns_provider_token_is_an_es256_jwt_from_our_key(
    apns_sender: ApnsSender, fake_apns: FakeApns, apns_key: ApnsKey
) -> None:
    message, now = approval_request()

    await apns_sender.send("a1b2c3", message, now=now)

    request = fake_apns.requests[0]
    assert request.jwt_header() == {"alg": "ES256", "kid": apns_key.key_id, "typ": "JWT"}
    claims = request.jwt_claims(apns_key.public_key_pem)
    assert claims["iss"] == apns_key.team_id
    assert abs(claims["iat"] - time.time()) < 60


@pytest.mark.parametrize(
    "reply",
    [
        apns_replies.bad_device_token(),
        apns_replies.unregistered(),
        apns_replies.device_token_not_for_topic(),
    ],
    ids=["BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"],
)
async def test_apns_dead_tokens_are_invalid(
    apns_sender: ApnsSender, fake_apns: FakeApns, reply: Reply
) -> None:
    fake_apns.reply(reply)
    message, now = approval_request()

    result = await apns_sender.send("dead", message, now=now)

    assert result.outcome == "invalid_token"


async def test_apns_unavailable_is_retried(apns_sender: ApnsSender, fake_apns: FakeApns) -> None:
    fake_apns.reply(apns_replies.service_unavailable(), apns_replies.too_many_requests(5))
    message, now = approval_request()

    first = await apns_sender.send("t", message, now=now)
    second = await apns_sender.send("t", message, now=now)

    assert (first.outcome, first.retry_after) == ("retry", None)
    assert (second.outcome, second.retry_after) == ("retry", 5.0)


async def test_apns_rejected_provider_token_fails(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    fake_apns.reply(apns_replies.invalid_provider_token())
    message, now = approval_request()

    assert (await apns_sender.send("t", message, now=now)).outcome == "failed"


async def test_apns_timeout_is_retried_and_the_late_answer_is_harmless(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    fake_apns.reply(apns_replies.slow(TIMEOUT + 0.2))
    message, now = approval_request()

    result = await apns_sender.send("t", message, now=now)
    await asyncio.sleep(0.4)  # the late answer arrives on the same connection
    again = await apns_sender.send("t", message, now=now)

    assert (result.outcome, result.detail) == ("retry", "timeout")
    assert again.outcome == "accepted"


async def test_apns_reconnects_after_the_server_drops_the_connection(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    message, now = approval_request()
    assert (await apns_sender.send("t", message, now=now)).outcome == "accepted"

    fake_apns.drop_connections()
    await asyncio.sleep(0.05)

    assert (await apns_sender.send("t", message, now=now)).outcome == "accepted"
    assert len(fake_apns.requests) == 2


async def test_apns_does_not_send_an_expired_request(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    message, now = approval_request(lifetime=-1)

    result = await apns_sender.send("t", message, now=now)

    assert (result.outcome, result.detail) == ("failed", "expired")
    assert fake_apns.requests == []


async def test_apns_refuses_a_server_our_ca_file_does_not_vouch_for(
    fake_apns: FakeApns, apns_key: ApnsKey, tmp_path: Path
) -> None:
    sender = ApnsSender(
        key=apns_key.path.read_text(),
        key_id=apns_key.key_id,
        team_id=apns_key.team_id,
        topic=APNS_TOPIC,
        endpoint=fake_apns.endpoint,
        ca_file=None,
        timeout=3.0,
        max_connection_attempts=1,
    )
    message, now = approval_request()
    try:
        result = await sender.send("t", message, now=now)
    finally:
        await sender.close()

    assert result.outcome == "retry"
    assert result.detail.startswith("connection")
    assert fake_apns.requests == []


async def test_apns_over_cleartext_http2(
    fake_apns_cleartext: FakeApns, apns_key: ApnsKey, tmp_path: Path
) -> None:
    env = apns_env_for(fake_apns_cleartext, apns_key)
    sender = ApnsSender.from_settings(settings(env, tmp_path), timeout=TIMEOUT)
    message, now = approval_request()
    try:
        result = await sender.send("t", message, now=now)
    finally:
        await sender.close()

    assert result.outcome == "accepted"
    assert fake_apns_cleartext.requests[0].headers["apns-collapse-id"] == message.approval_id


# Twilio


@pytest.fixture
async def twilio(twilio_env: dict[str, str], tmp_path: Path) -> AsyncIterator[TwilioSms]:
    sender = TwilioSms.from_settings(settings(twilio_env, tmp_path), timeout=TIMEOUT)
    yield sender
    await sender.close()


async def test_twilio_posts_the_form_with_basic_auth(
    twilio: TwilioSms, fake_twilio: FakeTwilio, twilio_env: dict[str, str]
) -> None:
    result = await twilio.send("+15558675310", "Your tapprove code: 123456")

    assert result.outcome == "accepted"
    assert result.detail.startswith("SM")
    [request] = fake_twilio.requests
    assert request.path == f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
    assert request.form == {
        "To": "+15558675310",
        "From": twilio_env["TAPPROVE_TWILIO_FROM"],
        "Body": "Your tapprove code: 123456",
    }
    assert request.basic_auth == (fake_twilio.account_sid, fake_twilio.auth_token)


@pytest.mark.parametrize(
    "reply", [twilio_replies.invalid_number(), twilio_replies.not_mobile()], ids=["21211", "21614"]
)
async def test_twilio_invalid_numbers_are_invalid(
    twilio: TwilioSms, fake_twilio: FakeTwilio, reply: Reply
) -> None:
    fake_twilio.reply(reply)

    result = await twilio.send("+1555", "code")

    assert result.outcome == "invalid_token"


async def test_twilio_unavailable_is_retried_after_retry_after(
    twilio: TwilioSms, fake_twilio: FakeTwilio
) -> None:
    fake_twilio.reply(twilio_replies.service_unavailable(retry_after=5))

    result = await twilio.send("+15558675310", "code")

    assert (result.outcome, result.retry_after) == ("retry", 5.0)


async def test_twilio_rate_limit_is_retried(twilio: TwilioSms, fake_twilio: FakeTwilio) -> None:
    fake_twilio.reply(twilio_replies.too_many_requests(retry_after=2))

    result = await twilio.send("+15558675310", "code")

    assert (result.outcome, result.retry_after) == ("retry", 2.0)


async def test_twilio_wrong_credentials_fail(
    twilio_env: dict[str, str], fake_twilio: FakeTwilio, tmp_path: Path
) -> None:
    env = {**twilio_env, "TAPPROVE_TWILIO_AUTH_TOKEN": "wrong"}
    sender = TwilioSms.from_settings(settings(env, tmp_path), timeout=TIMEOUT)
    try:
        result = await sender.send("+15558675310", "code")
    finally:
        await sender.close()

    assert result.outcome == "failed"
    assert result.detail == "401 20003"


async def test_twilio_timeout_is_retried(twilio: TwilioSms, fake_twilio: FakeTwilio) -> None:
    fake_twilio.reply(twilio_replies.slow(3.0))

    result = await twilio.send("+15558675310", "code")

    assert (result.outcome, result.detail) == ("retry", "timeout")


# The configured set


async def test_build_providers_builds_only_what_is_configured(
    provider_env: dict[str, str], fcm_env: dict[str, str], tmp_path: Path
) -> None:
    everything = await build_providers(settings(provider_env, tmp_path))
    only_fcm = await build_providers(settings(fcm_env, tmp_path))
    nothing = await build_providers(Settings(data_dir=tmp_path))
    try:
        assert isinstance(everything.fcm, FcmSender)
        assert isinstance(everything.apns, ApnsSender)
        assert isinstance(everything.sms, TwilioSms)
        assert isinstance(only_fcm.fcm, FcmSender)
        assert only_fcm.apns is None
        assert (nothing.fcm, nothing.apns) == (None, None)
        # Without Twilio, SMS goes to the log (like mail without SMTP).
        assert isinstance(only_fcm.sms, LogSms) and isinstance(nothing.sms, LogSms)
    finally:
        for providers in (everything, only_fcm, nothing):
            await providers.close()


async def test_built_providers_deliver_through_every_channel(
    provider_env: dict[str, str],
    fake_fcm: FakeFcm,
    fake_apns: FakeApns,
    fake_twilio: FakeTwilio,
    apns_test_ca: ThrowawayCa,
    tmp_path: Path,
) -> None:
    providers = await build_providers(settings(provider_env, tmp_path))
    message, now = approval_request()
    try:
        assert providers.fcm is not None and providers.apns is not None
        assert providers.sms is not None
        results = await asyncio.gather(
            providers.fcm.send("fcm-token", message, now=now),
            providers.apns.send("apns-token", message, now=now),
            providers.sms.send("+15558675310", "Your tapprove code: 123456"),
        )
    finally:
        await providers.close()

    assert [r.outcome for r in results] == ["accepted"] * 3
    assert (len(fake_fcm.requests), len(fake_apns.requests), len(fake_twilio.requests)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("TAPPROVE_APNS_TOPIC", "TAPPROVE_APNS_TOPIC"),
        ("TAPPROVE_TWILIO_FROM", "TAPPROVE_TWILIO_FROM"),
    ],
)
async def test_a_half_configured_provider_fails_at_startup(
    provider_env: dict[str, str], tmp_path: Path, drop: str, message: str
) -> None:
    env = {k: v for k, v in provider_env.items() if k != drop}

    with pytest.raises(ValueError, match=message):
        await build_providers(settings(env, tmp_path))


def test_a_fake_runs_on_its_own_thread_for_synchronous_callers() -> None:
    with run_in_thread(FakeTwilio()) as fake:
        response = httpx.post(
            f"{fake.url}/2010-04-01/Accounts/{fake.account_sid}/Messages.json",
            data={"To": "+15558675310", "From": "+15005550006", "Body": "hi"},
            auth=(fake.account_sid, fake.auth_token),
        )

    assert response.status_code == 201
    assert fake.requests[0].form["Body"] == "hi"
