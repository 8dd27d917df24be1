"""Who may make a code that adds a device (app.core.enrollment.enrollment_kind)."""

from __future__ import annotations

import pytest

from app.core.enrollment import EnrollmentRefused, enrollment_kind

SESSIONS = {
    "restricted": {"restricted": True, "approved_with_device": False, "approved_with_sms": False},
    "device": {"restricted": False, "approved_with_device": True, "approved_with_sms": False},
    "sms": {"restricted": False, "approved_with_device": False, "approved_with_sms": True},
    "trusted browser": {
        "restricted": False,
        "approved_with_device": False,
        "approved_with_sms": False,
    },
    "recovery code": {
        "restricted": False,
        "approved_with_device": False,
        "approved_with_sms": False,
        "approved_with_recovery_code": True,
    },
    "passkey": {
        "restricted": False,
        "approved_with_device": False,
        "approved_with_sms": False,
        "signed_in_with_passkey": True,
    },
}


@pytest.mark.parametrize(
    ("session", "has_device", "had_second_factor", "kind"),
    [
        # A brand-new account: the password enrolls the first device.
        ("restricted", False, False, "first_device"),
        # Had one, lost them all: the password alone is not enough, whatever the session.
        ("restricted", False, True, None),
        ("trusted browser", False, True, None),
        ("sms", False, True, "recovery"),
        ("recovery code", False, True, "recovery"),
        ("passkey", False, True, "passkey"),
        ("device", False, True, "device"),
        # Has one: only a session approved on a device adds another.
        ("restricted", True, True, None),
        ("sms", True, True, None),
        ("recovery code", True, True, None),
        ("trusted browser", True, True, None),
        ("device", True, True, "device"),
        ("passkey", True, True, "passkey"),
    ],
)
def test_the_kind_of_code_a_session_may_make(
    session: str, has_device: bool, had_second_factor: bool, kind: str | None
) -> None:
    def decide() -> str:
        return enrollment_kind(
            has_device=has_device, had_second_factor=had_second_factor, **SESSIONS[session]
        )

    if kind is None:
        with pytest.raises(EnrollmentRefused):
            decide()
    else:
        assert decide() == kind


def test_a_way_back_with_a_lost_phone_still_enrolled_is_told_to_revoke_it_first() -> None:
    with pytest.raises(EnrollmentRefused) as refused:
        enrollment_kind(has_device=True, had_second_factor=True, **SESSIONS["recovery code"])
    assert "revoke the one you lost" in refused.value.message
