"""The reference phone (mobile_stub) on a Duo integration's request: it names the
integration, shows the client's own lines (pushinfo), and in phone-only confirmation asks
only approve or deny."""

from __future__ import annotations

import time
from typing import Any

from mobile_stub.cli import Output, StdinLines, describe_approval, interactive_decider

APPROVAL: dict[str, Any] = {
    "id": "a" * 32,
    "status": "pending",
    "created_at": "2026-12-06T10:00:00Z",
    "expires_at": "2999-01-01T00:00:00Z",
    "context": {
        "ip": "198.51.100.7",
        "user_agent": "login_duo/1.11.3 (x86_64-pc-linux-gnu) libduo/1.11.3",
        "browser": "ssh-servers",
        "os": "login_duo/1.11.3",
        "details": [
            {"label": "Server IP", "value": "192.0.2.2"},
            {"label": "Command", "value": "sudo reboot\x1b[2K"},
        ],
    },
    "match": {"mode": "confirm", "digits": 2},
    "number_choices": ["42"],
    "requester": {"kind": "rp", "name": "ssh-servers"},
    "challenge": "c" * 43,
}


def test_a_duo_request_shows_the_integration_and_its_lines() -> None:
    lines = describe_approval(APPROVAL, time.time())
    assert lines[0] == f"Approval request {'a' * 32} from ssh-servers"
    assert "  Server IP: 192.0.2.2" in lines
    assert "  Command:  sudo reboot[2K" in lines  # the escape cannot steer the terminal
    assert "  Confirm:  approve or deny on this phone (no number to compare)" in lines
    assert not any(line.startswith("  Choices:") for line in lines)


class Typed(StdinLines):
    """What the person types, line by line."""

    def __init__(self, *lines: str) -> None:
        super().__init__()
        self.lines = list(lines)

    async def readline(self, *, discard_typed_ahead: bool = False) -> str | None:
        return self.lines.pop(0) if self.lines else None


async def test_confirming_asks_no_number_and_sends_the_one_choice() -> None:
    decide = interactive_decider(Typed("a"), Output(as_json=True))
    decision = await decide(APPROVAL)
    assert decision is not None
    assert (decision.decision, decision.number) == ("approve", "42")


async def test_a_request_with_a_number_still_asks_for_it() -> None:
    typed = {**APPROVAL, "match": {"mode": "typed", "digits": 2}}
    del typed["number_choices"]
    decide = interactive_decider(Typed("17", "a"), Output(as_json=True))
    decision = await decide(typed)
    assert decision is not None and decision.number == "17"
