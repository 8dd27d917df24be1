"""Enrollment: the link a phone opens or scans (`tapprove://enroll?url=<PUBLIC_URL>&code=<code>`),
and who may make a code that adds a device."""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote


def enrollment_uri(public_url: str, code: str) -> str:
    """Build the link for `code` on the server at `public_url` (both percent-encoded)."""
    return f"tapprove://enroll?url={quote(public_url, safe='')}&code={quote(code, safe='')}"


# Who vouches for a new device, recorded on its enrollment code:
# - first_device: a password-only (restricted) session of an account that never had a second
#   factor; used only while the account still has none.
# - recovery: a session that proved something besides the password (an SMS code to the
#   verified number; recovery codes later) while the account had no active device; used only
#   if no device was enrolled since it was made.
# - device: a session approved on one of the user's devices.
# - operator: the CLI (`tapprove device enroll-code`, `user reset-phones`, `user import`).
EnrollmentKind = Literal["first_device", "recovery", "device", "operator"]


class EnrollmentRefused(Exception):
    """This session may not add a device now; the message says what would let it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


ANOTHER_DEVICE = "adding another device needs a sign-in approved on one of your devices"
RECOVERY = (
    "this account has had a phone, so a password is not enough to add one: sign in with an "
    "SMS code to your verified number, or ask your administrator for a reset link"
)


def enrollment_kind(
    *,
    has_device: bool,
    had_second_factor: bool,
    restricted: bool,
    approved_with_device: bool,
    approved_with_sms: bool,
) -> EnrollmentKind:
    """The kind of enrollment code a session may make now, or EnrollmentRefused.

    The password alone (a restricted session) enrolls only an account's very first device;
    after that, a new device needs a sign-in approved on a device, or, once every device is
    gone, another proof (an SMS code now; a recovery code is the next one to add here).
    """
    if approved_with_device:
        return "device"
    if has_device:
        raise EnrollmentRefused(ANOTHER_DEVICE)
    if approved_with_sms:
        return "recovery"
    if restricted and not had_second_factor:
        return "first_device"
    raise EnrollmentRefused(RECOVERY)
