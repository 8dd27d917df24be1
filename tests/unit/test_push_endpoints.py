"""The Web Push SSRF guard's pure parts: which endpoints pass, which addresses are public,
and the settings that refuse test endpoints outside tests."""

from __future__ import annotations

import pydantic
import pytest

from app.delivery.push_endpoints import EndpointPolicy, EndpointRefused, public_address
from app.settings import DEFAULT_WEBPUSH_HOSTS, Settings

DEFAULT = EndpointPolicy(Settings().webpush_hosts)


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://fcm.googleapis.com/fcm/send/dXNlcjpmb28:APA91bH-x_y",
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk-x_y",
        "https://web.push.apple.com/QGuQyavXutnMH-u2nxlNDOr4cNmE?x=1",
        "https://wns2-par02p.notify.windows.com/w/?token=BQYAAAB%2bx",
        "https://fcm.googleapis.com:443/fcm/send/x",
        "https://FCM.googleapis.com/fcm/send/x",
    ],
)
def test_the_public_push_services_pass(endpoint: str) -> None:
    checked = DEFAULT.check(endpoint)
    assert checked.scheme == "https" and checked.port == 443
    assert checked.origin == f"https://{checked.host}"


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://fcm.googleapis.com/fcm/send/x", "only https"),
        ("ftp://fcm.googleapis.com/x", "only https"),
        ("https://fcm.googleapis.com.attacker.example/x", "not an allowed push service"),
        ("https://attacker-fcm.googleapis.com.example/x", "not an allowed push service"),
        ("https://xfcm.googleapis.com/x", "not an allowed push service"),
        ("https://googleapis.com/x", "not an allowed push service"),
        ("https://fcm.googleapis.com./x", "not a valid host name"),
        ("https://fcm.googleapis.com:8443/x", "port 443"),
        ("https://user:pw@fcm.googleapis.com/x", "user information"),
        ("https://attacker.example@fcm.googleapis.com/x", "user information"),
        ("https://fcm.googleapis.com\\@attacker.example/x", "user information"),
        ("https://fcm.googleapis.com\\.attacker.example/x", "not a plain URL"),
        ("https://fcm.googleapis.com/x#frag", "not a plain URL"),
        ("https://fcm.googleapis.com/x y", "not a plain URL"),
        ("https://fcm.googleapis.com/\u00e9", "not a plain URL"),
        ("https://xn--fcm-googleapis.com/x", "not an allowed push service"),
        ("https://10.0.0.1/x", "IP address"),
        ("https://127.0.0.1/x", "IP address"),
        ("https://[::ffff:127.0.0.1]/x", "IP address"),
        ("https://2130706433/x", "not a valid host name"),
        ("https://0x7f.1/x", "not a valid host name"),
        ("http://127.0.0.1:9999/x", "IP address"),
        ("https://fcm.googleapis.com/" + "x" * 2048, "longer than"),
        ("fcm.googleapis.com/x", "only https"),
        ("", "not a plain URL"),
    ],
)
def test_everything_else_is_refused(endpoint: str, reason: str) -> None:
    with pytest.raises(EndpointRefused, match=reason):
        DEFAULT.check(endpoint)


def test_a_suffix_covers_the_host_and_its_subdomains_only() -> None:
    policy = EndpointPolicy(("notify.windows.com",))
    assert policy.host_allowed("notify.windows.com")
    assert policy.host_allowed("wns2-bn3p.notify.windows.com")
    assert not policy.host_allowed("evilnotify.windows.com")
    assert not policy.host_allowed("notify.windows.com.evil.example")


def test_a_test_service_passes_over_http_at_its_own_address_and_port_only() -> None:
    policy = EndpointPolicy((), frozenset({("127.0.0.1", 4000)}))
    checked = policy.check("http://127.0.0.1:4000/push/abc?x=1")
    assert (checked.scheme, checked.host, checked.port, checked.path, checked.query) == (
        "http",
        "127.0.0.1",
        4000,
        "/push/abc",
        "x=1",
    )
    assert checked.origin == "http://127.0.0.1:4000"
    for other in (
        "http://127.0.0.1:4001/push/abc",
        "https://127.0.0.1:4000/push/abc",
        "http://127.0.0.2:4000/push/abc",
        "http://localhost:4000/push/abc",
    ):
        with pytest.raises(EndpointRefused):
            policy.check(other)


@pytest.mark.parametrize(
    "address",
    ["142.250.185.74", "2a00:1450:4001:80b::200a", "17.253.144.10"],
)
def test_public_addresses_are_public(address: str) -> None:
    assert public_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "240.0.0.1",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1%eth0",
        "fd00::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "ff02::1",
        "not an address",
    ],
)
def test_private_loopback_link_local_and_reserved_addresses_are_not(address: str) -> None:
    assert not public_address(address)


def test_the_default_allow_list_is_the_four_public_push_services() -> None:
    assert Settings().webpush_hosts == (
        "fcm.googleapis.com",
        "push.services.mozilla.com",
        "web.push.apple.com",
        "notify.windows.com",
    )
    assert Settings(webpush_allowed_hosts="*.Example.com, .push.example.org").webpush_hosts == (
        "example.com",
        "push.example.org",
    )
    assert DEFAULT_WEBPUSH_HOSTS.count(",") == 3


def test_test_endpoints_are_refused_without_test_mode() -> None:
    with pytest.raises(pydantic.ValidationError, match="TAPPROVE_TEST_MODE"):
        Settings(webpush_test_endpoints="127.0.0.1:4000")
    assert Settings(webpush_test_endpoints="127.0.0.1:4000", test_mode=True).test_mode


def test_test_mode_is_refused_with_an_https_public_url() -> None:
    with pytest.raises(pydantic.ValidationError, match="https"):
        Settings(test_mode=True, public_url="https://mfa.example.com")


@pytest.mark.parametrize("entry", ["10.0.0.1:80", "example.com:80", "127.0.0.1", "127.0.0.1:0"])
def test_test_endpoints_must_be_loopback_ip_and_port(entry: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="loopback"):
        Settings(webpush_test_endpoints=entry, test_mode=True)


def test_without_test_mode_no_test_service_is_honoured() -> None:
    # Settings refuses the combination; a policy built from test-mode-less settings has none.
    settings = Settings(test_mode=True, webpush_test_endpoints="127.0.0.1:4000")
    assert EndpointPolicy.from_settings(settings).test_services == {("127.0.0.1", 4000)}
    off = settings.model_copy(update={"test_mode": False})
    assert EndpointPolicy.from_settings(off).test_services == frozenset()


@pytest.mark.parametrize("subject", ["ops@example.com", "http://example.com", "tel:+1"])
def test_the_vapid_subject_is_a_mailto_or_https_contact(subject: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="mailto"):
        Settings(vapid_subject=subject)
    assert Settings(mail_from="ops@example.com").webpush_contact == "mailto:ops@example.com"
