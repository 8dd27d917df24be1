"""Which named values are secrets: the one list that log lines (app.logs) and audit details
(app.db.audit) both redact, so the two can never disagree about what is secret."""

from __future__ import annotations

# Values under these names never reach a log line or an audit row, whoever passes them.
# `number` is the match number a person carries from the browser to the phone: a short code.
SECRET_FIELDS = frozenset(
    {
        "password",
        "password_hash",
        "token",
        "device_token",
        "push_token",
        "api_key",
        "code",
        "jws",
        "challenge",
        "number",
        "secret",
        "cookie",
        "session",
        "authorization",
    }
)
REDACTED = "[redacted]"


def is_secret(name: str) -> bool:
    """Whether a value named `name` must be redacted (case does not matter)."""
    return name.lower() in SECRET_FIELDS
