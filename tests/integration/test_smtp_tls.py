"""SMTP over TLS through the real aiosmtplib client to a real aiosmtpd server: STARTTLS on
`smtp://` and implicit TLS on `smtps://`, with certificate checks left on.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from app.delivery.mail import Mail, MailError, SmtpMailer
from tests.fakes.apns import ThrowawayCa, make_test_ca
from tests.fixtures.app import free_port


class Inbox:
    """An aiosmtpd handler that keeps what it received and whether the session was TLS."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bool]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        encrypted = server.transport.get_extra_info("ssl_object") is not None
        self.messages.append((envelope.content.decode(), encrypted))
        return "250 OK"


@pytest.fixture
def test_ca(tmp_path: Path) -> ThrowawayCa:
    return make_test_ca(tmp_path / "ca")


def server_context(ca: ThrowawayCa) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.cert_file, ca.key_file)
    return context


@pytest.fixture
def trust(test_ca: ThrowawayCa, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust the test CA the way an operator would: through OpenSSL's SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.ca_file))


def running(controller: Controller) -> Iterator[Controller]:
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


MAIL = Mail(
    message_id="<m1@tapprove>",
    to="ada@example.com",
    subject="Hello",
    text="plain body",
    html="<p>html body</p>",
)


async def test_smtp_upgrades_with_starttls_when_the_server_offers_it(
    test_ca: ThrowawayCa, trust: None
) -> None:
    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_context(test_ca),
        require_starttls=True,
    )
    for _ in running(controller):
        await SmtpMailer(f"smtp://127.0.0.1:{port}", "tapprove@example.com").send(MAIL, now=0)
    assert len(inbox.messages) == 1
    content, over_tls = inbox.messages[0]
    assert over_tls, "the message must travel after STARTTLS"
    assert "Message-ID: <m1@tapprove>" in content and "plain body" in content


async def test_smtps_speaks_tls_from_the_first_byte(test_ca: ThrowawayCa, trust: None) -> None:
    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=port, ssl_context=server_context(test_ca)
    )
    for _ in running(controller):
        await SmtpMailer(f"smtps://127.0.0.1:{port}", "tapprove@example.com").send(MAIL, now=0)
    assert len(inbox.messages) == 1 and inbox.messages[0][1]


async def test_an_untrusted_certificate_is_refused_and_retried_later(
    test_ca: ThrowawayCa,
) -> None:
    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=port, ssl_context=server_context(test_ca)
    )
    for _ in running(controller):
        with pytest.raises(MailError) as refused:
            await SmtpMailer(f"smtps://127.0.0.1:{port}", "tapprove@example.com").send(MAIL, now=0)
    assert inbox.messages == []
    assert not refused.value.permanent
