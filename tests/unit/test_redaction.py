"""One list of secret names for log lines and audit details: whatever one redacts, so does
the other (they once disagreed about the match number)."""

from __future__ import annotations

import logging

import orjson
import pytest

from app.core.redaction import REDACTED, SECRET_FIELDS
from app.db.audit import detail_json
from app.logs import JsonFormatter


def logged(**extra: object) -> dict[str, object]:
    record = logging.makeLogRecord({"name": "t", "levelname": "INFO", "msg": "m", **extra})
    found: dict[str, object] = orjson.loads(JsonFormatter().format(record))
    return found


@pytest.mark.parametrize("name", sorted(SECRET_FIELDS))
def test_a_secret_is_redacted_in_a_log_line_and_in_an_audit_detail(name: str) -> None:
    assert logged(**{name: "s3cret"})[name] == REDACTED
    assert orjson.loads(detail_json({name: "s3cret"}))[name] == REDACTED
    assert orjson.loads(detail_json({"nested": [{name.upper(): "s3cret"}]}))["nested"] == [
        {name.upper(): REDACTED}
    ]


def test_the_match_number_is_a_secret_in_both() -> None:
    assert logged(number="42")["number"] == REDACTED
    assert orjson.loads(detail_json({"number": "42"}))["number"] == REDACTED


def test_other_names_are_kept() -> None:
    assert logged(approval_id="a1")["approval_id"] == "a1"
    assert orjson.loads(detail_json({"channel": "fcm"})) == {"channel": "fcm"}
