"""What the Duo face says, and when a held status poll answers: login_duo lets a login
through after 20 status replies without a result, so 20 polls must outlast any approval."""

from __future__ import annotations

import bson
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.matching import MatchPolicy
from app.duo import answers
from app.duo.answers import (
    FIRST_REPLY,
    MAX_TTL,
    MIN_HOLD,
    STATUS_HOLD,
    STATUS_POLLS,
    V1_SCHEDULE,
    V2_HOLD,
    Phone,
    duo_ttl,
    schedule,
)
from app.duo.params import BadParams, checked, parse_json, parse_query, pushinfo_details
from app.duo.replies import Encoding, encode

CREATED = 1_800_000_000.0
hold_until = V1_SCHEDULE.hold_until


def test_back_to_back_polls_outlast_the_longest_duo_approval() -> None:
    # login_duo on a terminal: 20 status calls, each sent the moment the last one answered.
    now = CREATED + 0.01  # the first poll follows the async auth at once
    for _ in range(STATUS_POLLS):
        now = hold_until(CREATED, now)
    assert now > CREATED + MAX_TTL + STATUS_HOLD / 2


@given(gaps=st.lists(st.floats(min_value=0, max_value=40), min_size=STATUS_POLLS,
                     max_size=STATUS_POLLS))  # fmt: skip
def test_polls_with_any_gaps_outlast_the_longest_duo_approval(gaps: list[float]) -> None:
    now = CREATED
    for gap in gaps:
        start = now + gap
        end = hold_until(CREATED, start)
        assert end >= start + MIN_HOLD or end == CREATED + FIRST_REPLY
        now = end
    assert now > CREATED + MAX_TTL


def test_the_first_poll_answers_soon_and_later_ones_hold() -> None:
    first = hold_until(CREATED, CREATED + 0.02)
    assert first == CREATED + FIRST_REPLY
    second = hold_until(CREATED, first + 0.001)
    assert second == first + STATUS_HOLD


def test_login_duo_polls_follow_the_v1_schedule_in_every_match_mode() -> None:
    for mode in ("confirm", "typed", "choices", "nist"):
        assert schedule("v1", MatchPolicy.for_mode(mode)) == V1_SCHEDULE


def test_auth_status_holds_long_unless_the_client_must_show_a_number() -> None:
    # authentik calls auth_status once: an early "waiting" would fail its sign-in.
    confirm = schedule("v2", MatchPolicy.for_mode("confirm"))
    assert confirm.hold_until(CREATED, CREATED + 0.01) == CREATED + V2_HOLD
    typed = schedule("v2", MatchPolicy.for_mode("typed"))
    first = typed.hold_until(CREATED, CREATED + 0.01)
    assert first == CREATED + FIRST_REPLY
    assert typed.hold_until(CREATED, first) == first + V2_HOLD


def test_duo_approvals_live_at_most_max_ttl() -> None:
    assert duo_ttl(120) == 120
    assert duo_ttl(3600) == MAX_TTL


def test_an_ended_approval_answers_allow_or_deny_with_duo_statuses() -> None:
    assert answers.ended("approved", None).v2() == {
        "result": "allow",
        "status": "allow",
        "status_msg": "Success. Logging you in...",
    }
    assert answers.ended("denied", None).v2()["status"] == "deny"
    assert answers.ended("denied", "wrong_number").v2()["status"] == "deny"
    assert answers.ended("denied", "fraud").v2()["status"] == "fraud"
    assert answers.ended("expired", None).v2()["status"] == "timeout"
    for status in ("approved", "denied", "expired"):
        assert "result" in answers.ended(status, None).v1()


def test_a_pending_approval_is_waiting_and_v1_carries_no_result() -> None:
    confirm = answers.pushed(MatchPolicy.for_mode("confirm"), "42")
    assert confirm.v2()["result"] == "waiting" and "42" not in confirm.message
    assert confirm.v1() == {"status": confirm.message}
    assert "Enter 42" in answers.pushed(MatchPolicy.for_mode("typed"), "42").message
    assert "Pick 42" in answers.pushed(MatchPolicy.for_mode("choices"), "42").message


def test_preauth_answers_in_both_shapes() -> None:
    active = answers.active([Phone("d1", "Pixel"), Phone("d2", "iPhone")])
    assert active.v2() == {
        "result": "auth",
        "status_msg": "Account is active",
        "devices": [
            {"device": d, "type": "phone", "name": n, "number": "",
             "capabilities": ["auto", "push"]}
            for d, n in (("d1", "Pixel"), ("d2", "iPhone"))
        ],
    }  # fmt: skip
    v1 = active.v1("alice")
    assert v1["factors"] == {"default": "push1", "1": "push1"}
    assert "Pixel, iPhone" in str(v1["prompt"]) and str(v1["prompt"]).startswith("Duo login")
    enroll = answers.enroll("https://mfa.example.com/")
    assert enroll.v2()["enroll_portal_url"] == "https://mfa.example.com/"
    assert enroll.v1("alice") == {"result": "enroll", "status": enroll.message}
    assert answers.PREAUTH_LOCKED.v1("alice")["result"] == "deny"


def test_capabilities_list_sms_and_passcodes_only_when_the_user_has_them() -> None:
    plain, seeded = Phone("d1", "Pixel"), Phone("d2", "iPhone", passcodes=True)
    texted = Phone("d3", "Moto", passcodes=True, sms_number=answers.masked("+14155552671"))
    assert plain.capabilities == ["auto", "push"]
    assert seeded.capabilities == ["auto", "push", "mobile_otp"]
    assert texted.capabilities == ["auto", "push", "sms", "mobile_otp"]
    assert answers.active([texted]).v2()["devices"] == [
        {"device": "d3", "type": "phone", "name": "Moto", "number": "XXX-XXX-2671",
         "capabilities": ["auto", "push", "sms", "mobile_otp"]},
    ]  # fmt: skip
    # login_duo offers the SMS option only when one can go, under the factor name it sends.
    v1 = answers.active([texted]).v1("alice")
    assert v1["factors"] == {"default": "push1", "1": "push1", "2": "smsrefresh1"}
    assert "  2. SMS passcodes to XXX-XXX-2671\n" in str(v1["prompt"])
    assert str(v1["prompt"]).endswith("Passcode or option (1-2): ")
    assert str(answers.active([seeded]).v1("alice")["prompt"]).endswith("(1-1): ")


def test_sms_and_passcode_answers_say_what_duo_says() -> None:
    assert answers.SMS_SENT.v2() == {
        "result": "deny", "status": "sent", "status_msg": "New SMS passcodes sent.",
    }  # fmt: skip
    assert answers.SMS_SENT.v1() == {"result": "deny", "status": "New SMS passcodes sent."}
    assert answers.PASSCODE_WRONG.v2()["result"] == "deny"
    assert "in 60 seconds" in answers.too_many_passcodes(60).message


# --- replies ------------------------------------------------------------------------------


def test_bson_replies_decode_with_an_int32_code() -> None:
    raw = encode(Encoding.BSON, {"stat": "FAIL", "code": 40103, "message": "no"})
    assert bson.decode(raw) == {"stat": "FAIL", "code": 40103, "message": "no"}
    assert raw[4] == 0x02 and b"\x10code\x00" in raw  # 0x10: BSON int32, what duo_unix reads


def test_nul_never_reaches_a_reply() -> None:
    document = {"stat": "OK", "response": {"sta\x00tus": "a\x00b", "list": ["\x00"]}}
    assert bson.decode(encode(Encoding.BSON, document)) == {
        "stat": "OK",
        "response": {"status": "ab", "list": [""]},
    }
    assert b"\\u0000" not in encode(Encoding.JSON, document)
    assert orjson.loads(encode(Encoding.JSON, document))["response"]["status"] == "ab"


# --- parameters ---------------------------------------------------------------------------


def test_login_duos_pushinfo_becomes_labelled_lines() -> None:
    form = parse_query(
        b"pushinfo=Server%2BIP%3D192.0.2.2%26Command%3Decho%2520OK&user=alice"
    )
    assert pushinfo_details(checked(form)["pushinfo"]) == [
        ("Server IP", "192.0.2.2"),
        ("Command", "echo OK"),
    ]


@pytest.mark.parametrize(
    "pairs",
    [
        [("user", "al\x00ice")],
        [("us\x00er", "alice")],
        [("user", "a\x1bb")],
        [("user", "a"), ("user", "b")],
        [("user", "a" * 5000)],
    ],
)
def test_hostile_parameters_are_refused(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(BadParams):
        checked(pairs)


@pytest.mark.parametrize(
    "body",
    [b"[]", b'"x"', b"{", b'{"a": 1}', b'{"a": ["b"]}', b'{"a": "\\ud800"}', b"\xff"],
)
def test_json_bodies_must_be_objects_of_strings(body: bytes) -> None:
    with pytest.raises(BadParams):
        parse_json(body)


@pytest.mark.parametrize("raw", [b"user=%ff", b"user=\xff", b"&".join([b"a=b"] * 100)])
def test_forms_must_be_utf8_and_short(raw: bytes) -> None:
    with pytest.raises(BadParams):
        parse_query(raw)


def test_a_pushinfo_hiding_a_nul_is_refused() -> None:
    with pytest.raises(BadParams):
        pushinfo_details("Command=rm%00-rf")
