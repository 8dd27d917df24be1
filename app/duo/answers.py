"""What the Duo face answers, in Duo's words (pure): preauth results, auth and status
results for an approval in each state, in the v2 (JSON) and v1 (BSON) shapes, and when a
held status poll must answer.

Status polls are held until the approval ends or the next point of a schedule fixed from the
approval's creation, `first` seconds after it and then every `every` seconds (`Schedule`).
- v1 (`status.bson`): login_duo on a terminal (`async=1`) calls it up to 20 times back to back
  and lets the login through if none of the 20 replies carries a result. Its schedule starts
  `FIRST_REPLY` after creation (the client prints "Pushed a login request..." at once, with
  the number in a match mode), then every `STATUS_HOLD`. Each poll ends on a later point than
  the poll before it, so 20 polls outlast `created + FIRST_REPLY + 19 * STATUS_HOLD`, and
  approvals made through Duo live at most `MAX_TTL`, well inside that: the poll in flight
  when an approval expires answers `deny` (`timeout`), and so does every later one.
- v2 (`auth_status`): some clients call it once and take `waiting` as a failure (authentik),
  so it is held up to `V2_HOLD` (under a proxy's usual 60 s read timeout), answering early
  only when the client must show a number (a match mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from app.core.matching import MatchPolicy

STATUS_POLLS = 20  # login_duo's loop
FIRST_REPLY = 1.0
STATUS_HOLD = 15.0
V2_HOLD = 50.0
# A poll never answers sooner than this after it arrives (unless the approval ended), so
# back-to-back polls cannot use up the schedule's points faster than one each.
MIN_HOLD = 0.5
MAX_TTL = 270
assert MAX_TTL < FIRST_REPLY + (STATUS_POLLS - 1) * STATUS_HOLD - STATUS_HOLD / 2

Version = Literal["v1", "v2"]


class Result(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    WAITING = "waiting"


@dataclass(frozen=True)
class Answer:
    """An auth or status result: Duo's `result`, machine-readable `status`, and message."""

    result: Result
    status: str
    message: str

    def v2(self) -> dict[str, str]:
        return {"result": self.result.value, "status": self.status, "status_msg": self.message}

    def v1(self) -> dict[str, str]:
        # duo_unix prints `status` and ends on `result`; a waiting reply has no result.
        if self.result is Result.WAITING:
            return {"status": self.message}
        return {"result": self.result.value, "status": self.message}


ALLOWED = Answer(Result.ALLOW, "allow", "Success. Logging you in...")
DENIED = Answer(Result.DENY, "deny", "Login request denied.")
FRAUD = Answer(Result.DENY, "fraud", "Login request reported as fraudulent.")
TIMED_OUT = Answer(Result.DENY, "timeout", "Login timed out.")
LOCKED = Answer(
    Result.DENY, "locked_out", "Your account is locked after a fraud report; contact support."
)


PASSCODE_WRONG = Answer(Result.DENY, "deny", "Incorrect passcode. Please try again.")
SMS_SENT = Answer(Result.DENY, "sent", "New SMS passcodes sent.")
SMS_UNAVAILABLE = Answer(
    Result.DENY, "deny", "SMS passcodes cannot be sent: no verified phone number with SMS on."
)
SMS_FAILED = Answer(Result.DENY, "deny", "SMS passcodes could not be sent; try again later.")


def too_many_passcodes(retry_after: int) -> Answer:
    """The user's budget of wrong passcodes is spent (app.passcodes)."""
    return Answer(
        Result.DENY,
        "deny",
        f"Too many incorrect passcodes; try again in {retry_after} seconds.",
    )


def too_many_texts(retry_after: int) -> Answer:
    return Answer(
        Result.DENY,
        "deny",
        f"Too many SMS passcodes requested; try again in {retry_after} seconds.",
    )


def backed_off(retry_after: int) -> Answer:
    """After denied or unanswered requests the user's next one waits (push fatigue)."""
    return Answer(
        Result.DENY,
        "deny",
        f"Too many unanswered or denied requests; try again in {retry_after} seconds.",
    )


def pushed(match: MatchPolicy, number: str) -> Answer:
    """A pending approval, with the number to carry to the phone in a match mode."""
    text = "Pushed a login request to your device..."
    if match.mode == "choices":
        text += f" Pick {number} on your phone."
    elif match.mode != "confirm":
        text += f" Enter {number} on your phone."
    return Answer(Result.WAITING, "pushed", text)


def ended(status: str, reason: str | None) -> Answer:
    """The answer for an approval that ended with `status` (approved, denied, expired)."""
    if status == "approved":
        return ALLOWED
    if status == "expired":
        return TIMED_OUT
    return FRAUD if reason == "fraud" else DENIED


def duo_ttl(configured: int) -> int:
    """How long an approval made through Duo lives: the deployment's, at most MAX_TTL."""
    return min(configured, MAX_TTL)


@dataclass(frozen=True)
class Schedule:
    """When held status polls answer: `first` seconds after creation, then every `every`."""

    first: float
    every: float

    def hold_until(self, created_at: float, now: float) -> float:
        """When a poll arriving at `now` answers if the approval has not ended by then."""
        first = created_at + self.first
        if now + MIN_HOLD <= first:
            return first
        steps = math.ceil((now + MIN_HOLD - first) / self.every)
        return first + steps * self.every


V1_SCHEDULE = Schedule(FIRST_REPLY, STATUS_HOLD)


def schedule(version: Version, match: MatchPolicy) -> Schedule:
    """The status schedule of one face for an approval with this match policy."""
    if version == "v1":
        return V1_SCHEDULE
    shows_number = match.mode != "confirm"
    return Schedule(FIRST_REPLY if shows_number else V2_HOLD, V2_HOLD)


# --- preauth ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phone:
    """An enrolled device as preauth lists it, with what it can do: `mobile_otp` when it
    holds a passcode seed, `sms` when the user has a verified number that takes SMS."""

    device_id: str
    name: str
    passcodes: bool = False
    sms_number: str = ""  # the user's number, masked ("XXX-XXX-2671"); "" without SMS

    @property
    def capabilities(self) -> list[str]:
        found = ["auto", "push"]
        if self.sms_number:
            found.append("sms")
        if self.passcodes:
            found.append("mobile_otp")
        return found


def masked(number: str) -> str:
    """A phone number as preauth shows it: only its last four digits."""
    return f"XXX-XXX-{number[-4:]}"


@dataclass(frozen=True)
class Preauth:
    """A preauth result: `auth` with the user's phones, `enroll`, or `deny`."""

    result: Literal["auth", "enroll", "deny"]
    message: str
    phones: Sequence[Phone] = ()
    enroll_url: str = ""

    def v2(self) -> dict[str, object]:
        out: dict[str, object] = {"result": self.result, "status_msg": self.message}
        if self.result == "auth":
            out["devices"] = [
                {
                    "device": phone.device_id,
                    "type": "phone",
                    "name": phone.name,
                    "number": phone.sms_number,
                    "capabilities": phone.capabilities,
                }
                for phone in self.phones
            ]
        if self.result == "enroll":
            out["enroll_portal_url"] = self.enroll_url
        return out

    def v1(self, username: str) -> dict[str, object]:
        if self.result != "auth":
            return {"result": self.result, "status": self.message}
        names = ", ".join(phone.name for phone in self.phones)
        options = [f"Duo Push to {names}"]
        factors = {"default": PUSH_FACTOR, "1": PUSH_FACTOR}
        number = next((phone.sms_number for phone in self.phones if phone.sms_number), "")
        if number:
            options.append(f"SMS passcodes to {number}")
            factors["2"] = SMS_FACTOR
        listed = "".join(f"  {n}. {text}\n" for n, text in enumerate(options, start=1))
        return {
            "result": "auth",
            "status": self.message,
            "prompt": (
                f"Duo login for {username}\n\nChoose or lose:\n\n{listed}\n"
                f"Passcode or option (1-{len(options)}): "
            ),
            "factors": factors,
        }


# The v1 factor names that login_duo sends back as `auto=` (from `factors`); whatever else
# it sends there is what the person typed at the prompt: a passcode.
PUSH_FACTOR = "push1"
SMS_FACTOR = "smsrefresh1"
PUSH_NAMES = frozenset({PUSH_FACTOR, "push", "auto"})
SMS_NAMES = frozenset({SMS_FACTOR, "sms", "sms1"})


def active(phones: Sequence[Phone]) -> Preauth:
    return Preauth("auth", "Account is active", phones)


def enroll(url: str) -> Preauth:
    """The answer for a user with no phone, and for a username nobody has (see the docs)."""
    return Preauth(
        "enroll", f"Enroll an authentication device to proceed: {url}", enroll_url=url
    )


PREAUTH_LOCKED = Preauth("deny", LOCKED.message)
