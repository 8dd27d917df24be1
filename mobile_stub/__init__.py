"""The tapprove reference phone app: enrolls a device key and answers login approvals.

It speaks only the public protocol (docs/protocol.md §3) and imports nothing from `app`.
"""

from mobile_stub.client import (
    ApiError,
    Decider,
    DeviceAuthError,
    Event,
    PhoneClient,
    SessionEnded,
    always,
    enroll,
)
from mobile_stub.keys import DeviceKey
from mobile_stub.protocol import Backoff, Decision, EnrollLinkError, EnrollTarget, parse_enroll
from mobile_stub.state import DeviceState, StateError, load_state, save_state

__all__ = [
    "ApiError",
    "Backoff",
    "Decider",
    "Decision",
    "DeviceAuthError",
    "DeviceKey",
    "DeviceState",
    "EnrollLinkError",
    "EnrollTarget",
    "Event",
    "PhoneClient",
    "SessionEnded",
    "StateError",
    "always",
    "enroll",
    "load_state",
    "parse_enroll",
    "save_state",
]
