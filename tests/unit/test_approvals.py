"""Pending approvals: the Approval object of PROTOCOL §3 and the flat form the store keeps."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.approval.model import (
    ApprovalContext,
    PendingApproval,
    Status,
    new_approval,
)
from app.core.clock import ManualClock
from app.core.matching import MatchPolicy
from app.core.tokens import b64url_decode

NOW = ManualClock().now()
CONTEXT = ApprovalContext(
    ip="203.0.113.7", user_agent="Mozilla/5.0 (X11; Linux)", browser="Firefox 140", os="Linux"
)


def _approval(mode: str = "typed", **overrides: object) -> PendingApproval:
    approval = new_approval(
        user_id="u" * 32,
        kind="login",
        ttl=120,
        policy=MatchPolicy.for_mode(mode),
        context=CONTEXT,
        now=NOW,
        rng=random.Random(3),
    )
    return dataclasses.replace(approval, **overrides)  # type: ignore[arg-type]


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_only_pending_is_not_final() -> None:
    assert not Status.PENDING.final
    assert Status.APPROVED.final and Status.DENIED.final and Status.EXPIRED.final
    assert Status("approved") is Status.APPROVED and str(Status.DENIED) == "denied"


def test_a_new_approval_is_pending_with_fresh_id_challenge_and_number() -> None:
    approval = new_approval(
        user_id="u1",
        kind="rp",
        ttl=60,
        policy=MatchPolicy.for_mode("nist"),
        context=CONTEXT,
        now=NOW,
        api_key_id="k1",
    )
    assert re.fullmatch(r"[0-9a-f]{32}", approval.id)
    assert len(b64url_decode(approval.challenge)) == 32
    assert approval.status is Status.PENDING
    assert approval.created_at == NOW and approval.expires_at == NOW + 60
    assert len(approval.number) == 6 and approval.choices is None
    assert approval.kind == "rp" and approval.api_key_id == "k1"
    assert approval.decided_at is None and approval.channels == [] and not approval.completed


def test_two_approvals_never_share_an_id_or_challenge() -> None:
    first, second = _approval(), _approval()
    assert first.id != second.id and first.challenge != second.challenge


@pytest.mark.parametrize("ttl", [0, -1])
def test_an_approval_needs_a_positive_life(ttl: float) -> None:
    with pytest.raises(ValueError):
        new_approval(
            user_id="u1",
            kind="login",
            ttl=ttl,
            policy=MatchPolicy.for_mode("typed"),
            context=CONTEXT,
            now=NOW,
        )


def test_device_json_is_the_protocol_approval_object() -> None:
    approval = _approval("typed")
    assert approval.device_json() == {
        "id": approval.id,
        "status": "pending",
        "created_at": "2027-01-15T08:00:00Z",
        "expires_at": "2027-01-15T08:02:00Z",
        "context": {
            "ip": "203.0.113.7",
            "user_agent": "Mozilla/5.0 (X11; Linux)",
            "browser": "Firefox 140",
            "os": "Linux",
        },
        "match": {"mode": "typed", "digits": 2},
        "requester": {"kind": "login", "name": None},
        "challenge": approval.challenge,
    }


def test_a_relying_partys_approval_names_the_requester_for_the_phone() -> None:
    approval = _approval(kind="rp", requester_name="vpn")
    assert approval.device_json()["requester"] == {"kind": "rp", "name": "vpn"}


def test_number_choices_appear_only_in_choices_mode() -> None:
    for mode in ("typed", "nist"):
        assert "number_choices" not in _approval(mode).device_json()
    approval = _approval("choices")
    shown = approval.device_json()
    assert shown["number_choices"] == approval.choices
    assert list(shown) == [
        "id",
        "status",
        "created_at",
        "expires_at",
        "context",
        "match",
        "requester",
        "number_choices",
        "challenge",
    ]


def test_in_confirm_mode_the_phone_is_shown_the_number_as_its_one_choice() -> None:
    approval = _approval("confirm")
    shown = approval.device_json()
    assert shown["match"] == {"mode": "confirm", "digits": 2}
    assert shown["number_choices"] == [approval.number]


def test_context_details_appear_only_when_a_relying_party_gave_some() -> None:
    assert "details" not in _approval().device_json()["context"]  # type: ignore[operator]
    context = dataclasses.replace(
        CONTEXT, details=(("Server IP", "192.0.2.2"), ("Command", "sudo reboot"))
    )
    approval = _approval(context=context)
    assert approval.device_json()["context"] == {
        **CONTEXT.to_json(),
        "details": [
            {"label": "Server IP", "value": "192.0.2.2"},
            {"label": "Command", "value": "sudo reboot"},
        ],
    }
    assert PendingApproval.from_fields(approval.to_fields()) == approval


@pytest.mark.parametrize(
    "details", ['"text"', '[["a", "b"]]', '[{"label": "a"}]', '[{"label": 1, "value": "b"}]']
)
def test_malformed_context_details_are_refused(details: str) -> None:
    fields = _approval().to_fields()
    fields["context"] = fields["context"][:-1] + f', "details": {details}}}'
    with pytest.raises(ValueError, match="field context"):
        PendingApproval.from_fields(fields)


@pytest.mark.parametrize("mode", ["typed", "nist"])
def test_device_json_never_contains_the_number(mode: str) -> None:
    for _ in range(50):
        approval = new_approval(
            user_id="u1",
            kind="login",
            ttl=120,
            policy=MatchPolicy.for_mode(mode),
            context=CONTEXT,
            now=NOW,
        )
        shown = approval.device_json()
        assert "number" not in shown
        assert approval.number not in _leaves(shown)


def test_in_choices_mode_the_number_is_only_one_of_three_choices() -> None:
    approval = _approval("choices")
    shown = approval.device_json()
    leaves = _leaves({k: v for k, v in shown.items() if k != "number_choices"})
    assert approval.number not in leaves
    assert "number" not in shown


def test_device_json_shows_a_final_status() -> None:
    assert _approval(status=Status.DENIED).device_json()["status"] == "denied"


@pytest.mark.parametrize(
    ("status", "stored", "reason"),
    [
        (Status.PENDING, None, None),
        (Status.APPROVED, "sms_code", "sms_code"),
        (Status.EXPIRED, "superseded", "superseded"),
        # Ended before every end stored its reason: the status's default.
        (Status.APPROVED, None, "device"),
        (Status.DENIED, None, "denied"),
        (Status.EXPIRED, None, "timeout"),
    ],
)
def test_a_final_approval_says_why_it_ended(
    status: Status, stored: str | None, reason: str | None
) -> None:
    assert _approval(status=status, reason=stored).final_reason == reason


def test_a_relying_partys_approval_names_it_and_the_name_survives_the_store() -> None:
    approval = _approval(kind="rp", api_key_id="k" * 32, requester_name="vpn")
    assert approval.device_json()["requester"] == {"kind": "rp", "name": "vpn"}
    stored = PendingApproval.from_fields(approval.to_fields())
    assert stored.requester_name == "vpn"
    assert stored.device_json() == approval.device_json()


def test_fields_are_flat_strings_without_none() -> None:
    fields = _approval("typed").to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    for absent in ("choices", "decided_at", "decided_by", "reason", "browser_binding"):
        assert absent not in fields
    assert fields["remember_browser"] == "0" and fields["completed"] == "0"
    assert fields["match"] == '{"mode":"typed","digits":2}'
    assert fields["channels"] == "[]"
    assert float(fields["expires_at"]) == NOW + 120


def test_fields_round_trip_a_fresh_approval() -> None:
    for mode in ("typed", "choices", "nist"):
        approval = _approval(mode)
        assert PendingApproval.from_fields(approval.to_fields()) == approval


def test_fields_round_trip_a_decided_approval() -> None:
    approval = _approval(
        "choices",
        status=Status.DENIED,
        created_at=1_800_000_000.123456,
        decided_at=1_800_000_001.1 + 1e-7,
        decided_by="d" * 32,
        reason="fraud",
        browser_binding="b" * 64,
        remember_browser=True,
        api_key_id="k" * 32,
        channels=["websocket", "fcm"],
        completed=True,
    )
    fields = approval.to_fields()
    assert fields["remember_browser"] == "1" and fields["completed"] == "1"
    assert fields["channels"] == '["websocket","fcm"]'
    assert PendingApproval.from_fields(fields) == approval


def test_a_status_written_by_the_store_reads_back() -> None:
    # The store's Lua script rewrites these fields in place when a decision lands.
    fields = _approval().to_fields() | {
        "status": "approved",
        "decided_at": "1800000010",
        "decided_by": "d1",
    }
    approval = PendingApproval.from_fields(fields)
    assert approval.status is Status.APPROVED
    assert approval.decided_at == 1_800_000_010.0 and approval.decided_by == "d1"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("status", "maybe"),
        ("kind", "sso"),
        ("created_at", "yesterday"),
        ("expires_at", "nan"),
        ("completed", "true"),
        ("match", '{"mode":"typed"}'),
        ("match", "not json"),
        ("context", '{"ip": 1}'),
        ("channels", '"websocket"'),
        ("choices", "[1, 2, 3]"),
    ],
)
def test_a_corrupt_field_is_named_in_the_error(name: str, value: str) -> None:
    fields = _approval().to_fields() | {name: value}
    with pytest.raises(ValueError, match=f"field {name}"):
        PendingApproval.from_fields(fields)


@pytest.mark.parametrize("name", ["id", "status", "number", "challenge", "match", "channels"])
def test_a_missing_field_is_named_in_the_error(name: str) -> None:
    fields = _approval().to_fields()
    del fields[name]
    with pytest.raises(ValueError, match=f"field {name}: missing"):
        PendingApproval.from_fields(fields)


optional_text = st.none() | st.text(max_size=40)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(
    mode=st.sampled_from(["typed", "choices", "nist", "confirm"]),
    status=st.sampled_from(list(Status)),
    created_at=times,
    decided_at=st.none() | times,
    decided_by=optional_text,
    reason=optional_text,
    browser_binding=optional_text,
    api_key_id=optional_text,
    requester_name=optional_text,
    remember_browser=st.booleans(),
    completed=st.booleans(),
    channels=st.lists(st.text(max_size=10), max_size=4),
    context=st.builds(
        ApprovalContext,
        st.text(),
        st.text(),
        st.text(),
        st.text(),
        st.lists(st.tuples(st.text(), st.text()), max_size=3).map(tuple),
    ),
)
def test_any_approval_survives_the_round_trip(mode: str, **changes: object) -> None:
    approval = _approval(mode, **changes)
    assert PendingApproval.from_fields(approval.to_fields()) == approval


def test_an_empty_list_written_by_a_lua_script_reads_back() -> None:
    # Lua's cjson encodes an empty table as {}.
    fields = _approval().to_fields() | {"channels": "{}"}
    assert PendingApproval.from_fields(fields).channels == []


def test_a_result_event_ends_the_approval_with_its_status_and_time() -> None:
    pending = _approval(api_key_id="key-1")
    event = {"type": "result", "status": "expired", "decided_at": "1700000123.5"}
    ended = pending.ended(event | {"reason": "superseded"})
    assert ended is not None
    assert (ended.status, ended.decided_at) == (Status.EXPIRED, 1700000123.5)
    assert ended.final_reason == "superseded"
    assert (ended.id, ended.created_at, ended.api_key_id) == (
        pending.id,
        pending.created_at,
        pending.api_key_id,
    )
    assert pending.status is Status.PENDING  # the original is left as it was


@pytest.mark.parametrize(
    "event",
    [
        {"type": "result", "status": "approved"},
        {"type": "result", "decided_at": "1700000123.5"},
        {"type": "result", "status": "pending", "decided_at": "1700000123.5"},
        {"type": "result", "status": "maybe", "decided_at": "1700000123.5"},
        {"type": "result", "status": "denied", "decided_at": "soon"},
        # No reason (an event from an older process): the waiter reads the approval instead.
        {"type": "result", "status": "expired", "decided_at": "1700000123.5"},
        {"type": "result", "status": "expired", "decided_at": "1700000123.5", "reason": ""},
    ],
)
def test_a_result_event_that_does_not_say_enough_ends_nothing(event: dict[str, str]) -> None:
    assert _approval().ended(event) is None
