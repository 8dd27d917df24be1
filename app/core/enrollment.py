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
#   verified number, or a recovery code) while the account had no active device; used only
#   if no device was enrolled since it was made.
# - device: a session approved on one of the user's devices (a passcode from one included).
# - passkey: a passkey sign-in (at least as strong as a device's approval).
# - operator: the CLI (`tapprove device enroll-code`, `user reset-phones`, `user import`).
EnrollmentKind = Literal["first_device", "recovery", "device", "passkey", "operator"]


class EnrollmentRefused(Exception):
    """This session may not add a device now; the message says what would let it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


ANOTHER_DEVICE = "adding another device needs a sign-in approved on one of your devices"
RECOVERY = (
    "this account has had a phone, so a password is not enough to add one: sign in with a "
    "recovery code or an SMS code to your verified number, or ask your administrator for a "
    "reset link"
)
REVOKE_LOST_FIRST = (
    "a phone is still enrolled on this account: revoke the one you lost, then add the new one"
)


def enrollment_kind(
    *,
    has_device: bool,
    had_second_factor: bool,
    restricted: bool,
    approved_with_device: bool,
    approved_with_sms: bool,
    approved_with_recovery_code: bool = False,
    signed_in_with_passkey: bool = False,
) -> EnrollmentKind:
    """The kind of enrollment code a session may make now, or EnrollmentRefused.

    The password alone (a restricted session) enrolls only an account's very first device;
    after that, a new device needs a sign-in approved on a device (or a passkey sign-in), or,
    once every device is gone, another proof: an SMS code or a recovery code.
    """
    if approved_with_device:
        return "device"
    if signed_in_with_passkey:
        return "passkey"
    way_back = approved_with_sms or approved_with_recovery_code
    if has_device:
        raise EnrollmentRefused(REVOKE_LOST_FIRST if way_back else ANOTHER_DEVICE)
    if way_back:
        return "recovery"
    if restricted and not had_second_factor:
        return "first_device"
    raise EnrollmentRefused(RECOVERY)
