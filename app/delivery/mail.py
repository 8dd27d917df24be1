"""Mail: render the templates, then send through SMTP (aiosmtplib) or write to the log.

A mailer either returns (the server accepted the message) or raises `MailError`, which says
whether trying again could help. The outbox decides what to do with that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiosmtplib
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from app.settings import Settings

log = logging.getLogger(__name__)

# The mails the outbox knows how to render; each has .subject, .txt and .html templates.
TEMPLATES = frozenset(
    {
        "verify_email",
        "account_exists",
        "device_added",
        "passkey_added",
        "fraud_reported",
        "account_recovery",
    }
)
# Those that warn the owner about a change to their account's security (app.delivery.notices):
# losing one is an error worth an operator's attention, not routine.
SECURITY_NOTICES = frozenset(
    {"device_added", "passkey_added", "fraud_reported", "account_recovery"}
)


@dataclass(frozen=True)
class Mail:
    """One rendered message, ready to hand to a Mailer."""

    message_id: str
    to: str
    subject: str
    text: str
    html: str

    def to_email(self, sender: str, *, now: float) -> EmailMessage:
        """The MIME form: plain text with an HTML alternative."""
        message = EmailMessage()
        message["From"] = sender
        message["To"] = self.to
        message["Subject"] = self.subject
        message["Date"] = formatdate(now, usegmt=True)
        message["Message-ID"] = self.message_id
        # RFC 3834: tells auto-responders (vacation replies) not to answer.
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(self.text)
        message.add_alternative(self.html, subtype="html")
        return message


def message_id_for(outbox_id: str) -> str:
    """The SMTP Message-ID of an outbox message: a resend after a crash carries the same one."""
    return f"<{outbox_id}@tapprove>"


class MailError(Exception):
    """A failed send; `permanent` means retrying cannot help (e.g. the recipient was refused)."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class Mailer(Protocol):
    """Anything that can send a rendered mail or raise MailError; callers bound the time."""

    async def send(self, mail: Mail, *, now: float) -> None: ...


class MailRenderer:
    """Render outbox payloads into mails; every link is built from the public URL alone."""

    def __init__(self, public_url: str) -> None:
        self.public_url = public_url.rstrip("/")
        self._env = Environment(
            loader=PackageLoader("app", "templates/mail"),
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            # A payload missing a field is a bug: fail loudly instead of mailing a blank.
            undefined=StrictUndefined,
            keep_trailing_newline=True,
        )

    def links(self, payload: dict[str, Any]) -> dict[str, str]:
        """The URLs a template may use; never derived from a request's Host header."""
        urls = {
            "public_url": self.public_url,
            "login_url": f"{self.public_url}/",
            "account_url": f"{self.public_url}/account",
        }
        token = payload.get("token")
        if isinstance(token, str):
            urls["verify_url"] = f"{self.public_url}/verify-email?token={quote(token, safe='')}"
        return urls

    def render(
        self, template: str, payload: dict[str, Any], *, recipient: str, message_id: str
    ) -> Mail:
        """Render one of TEMPLATES; raises ValueError for an unknown template or missing field."""
        if template not in TEMPLATES:
            raise ValueError(f"unknown mail template {template!r}")
        # One line per value: a device name must not be able to add lines to a mail.
        fields = {k: " ".join(v.split()) if isinstance(v, str) else v for k, v in payload.items()}
        context = {**fields, **self.links(payload), "recipient": recipient}
        try:
            subject = self._env.get_template(f"{template}.subject").render(context).strip()
            context["subject"] = subject
            text = self._env.get_template(f"{template}.txt").render(context)
            html = self._env.get_template(f"{template}.html").render(context)
        except Exception as exc:  # jinja2's UndefinedError and friends
            raise ValueError(f"cannot render {template}: {exc}") from exc
        return Mail(message_id=message_id, to=recipient, subject=subject, text=text, html=html)


def classify(exc: BaseException) -> MailError:
    """Sort an SMTP failure into permanent (5xx for this message) or temporary (all else).

    A 5xx to MAIL, RCPT or DATA is about this message and will not change. A 5xx greeting,
    HELO or AUTH is about our server set-up, so it stays temporary: the operator can fix it
    while retries continue.
    """
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        return MailError(f"recipient refused: {detail}", permanent=all(c >= 500 for c in codes))
    session_level = (
        aiosmtplib.SMTPConnectResponseError,
        aiosmtplib.SMTPHeloError,
        aiosmtplib.SMTPAuthenticationError,
    )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        permanent = exc.code >= 500 and not isinstance(exc, session_level)
        return MailError(f"{exc.code} {exc.message}", permanent=permanent)
    if isinstance(exc, TimeoutError):
        return MailError("timed out", permanent=False)
    return MailError(f"{type(exc).__name__}: {exc}", permanent=False)


class SmtpMailer:
    """Send through `smtp://user:pass@host:port` (STARTTLS when offered) or `smtps://` (TLS)."""

    def __init__(self, url: str, sender: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("TAPPROVE_SMTP_URL must look like smtp://user:pass@host:port")
        self.sender = sender
        self.timeout = timeout  # per SMTP step; the outbox also bounds the whole send
        self.implicit_tls = parts.scheme == "smtps"
        self.host = parts.hostname
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    async def send(self, mail: Mail, *, now: float) -> None:
        """Deliver one mail to the server, or raise MailError."""
        message = mail.to_email(self.sender, now=now)
        try:
            await aiosmtplib.send(
                message,
                sender=self.sender,
                recipients=[mail.to],
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                use_tls=self.implicit_tls,
                # None: upgrade with STARTTLS whenever the server offers it.
                start_tls=None if not self.implicit_tls else False,
                timeout=self.timeout,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise classify(exc) from exc


class LogMailer:
    """The embedded default without SMTP: each mail is written to the log for the operator."""

    def __init__(self, sender: str) -> None:
        self.sender = sender

    async def send(self, mail: Mail, *, now: float) -> None:
        """Log the mail (its plain-text body holds any link) and report success."""
        log.info(
            "mail (no TAPPROVE_SMTP_URL set) to %s: %s\n%s",
            mail.to,
            mail.subject,
            mail.text,
            extra={"mail_to": mail.to, "message_id": mail.message_id},
        )


def build_mailer(settings: Settings) -> Mailer:
    """SMTP when `TAPPROVE_SMTP_URL` is set, else the log."""
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url, settings.mail_from)
    return LogMailer(settings.mail_from)
