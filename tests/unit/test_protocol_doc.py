"""docs/protocol.md names everything the code offers: every HTTP and WebSocket route, every
setting, every CLI command, every socket frame the server sends or accepts. A route, setting,
command or frame added without a line in the contract fails here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import Mount, Route, WebSocketRoute

from app import cli
from app.main import all_routes
from app.settings import Settings
from app.web import browser, device_socket

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
_PARAM = re.compile(r"{[^}]+}")
_PLACEHOLDER = re.compile(r"<[^>]+>")


def _section(title: str) -> str:
    """The text of the section whose heading ends with `title`, up to the next heading."""
    match = re.search(rf"^#+ [\d.]* ?{re.escape(title)}\n(.*?)(?=^#|\Z)", DOC, re.M | re.S)
    assert match, f"docs/protocol.md has no section {title!r}"
    return match.group(1)


def _names_call(method: str, path: str) -> bool:
    """Whether the doc names `METHOD /path` (path parameters written as <...> there)."""
    text = _PLACEHOLDER.sub("{}", DOC)
    shape = re.escape(f"{method} {_PARAM.sub('{}', path)}")
    return re.search(shape + r"(?![\w/{.-])", text) is not None


def _calls() -> Iterator[tuple[str, str]]:
    """(METHOD or WS, path) of every route of the app; a mount's routes under its prefix."""
    for route in all_routes():
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield method, route.path
        elif isinstance(route, WebSocketRoute):
            yield "WS", route.path
        elif isinstance(route, Mount) and route.routes:
            for inner in route.routes:
                if isinstance(inner, Route) and "{" not in inner.path:
                    yield "ANY", route.path + inner.path


def test_every_route_is_in_the_contract() -> None:
    missing: list[str] = []
    for method, path in _calls():
        # The Duo Auth API is named by path: its methods are Duo's.
        found = f"`{path}`" in DOC if method == "ANY" else _names_call(method, path)
        if not found:
            missing.append(f"{method} {path}")
    assert not missing, f"docs/protocol.md does not name: {missing}"
    assert "`/static/`" in DOC


def test_every_setting_is_in_the_settings_table() -> None:
    table = _section("Settings")
    missing = [
        f"TAPPROVE_{name.upper()}"
        for name in Settings.model_fields
        if f"| `TAPPROVE_{name.upper()}`" not in table
    ]
    assert not missing, f"docs/protocol.md §6.2 lacks: {missing}"


def _commands() -> Iterator[str]:
    for command in cli.app.registered_commands:
        assert command.callback is not None
        yield command.name or command.callback.__name__.replace("_", "-")
    for group in cli.app.registered_groups:
        assert group.typer_instance is not None
        for command in group.typer_instance.registered_commands:
            assert command.name is not None
            yield f"{group.name} {command.name}"


def test_every_cli_command_is_in_the_cli_table() -> None:
    table = _section("CLI")
    commands = list(_commands())
    assert len(commands) > 10
    missing = [c for c in commands if f"| `tapprove {c}" not in table]
    assert not missing, f"docs/protocol.md §6.1 lacks: {missing}"
    assert "`tapprove --version`" in table


def _frame_types_built(source: Path) -> set[str]:
    """The `type` of every frame a module builds as a dict literal."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "type"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    found.add(value.value)
    return found


def _frame_types_accepted() -> set[str]:
    """The frame types the device socket's reader compares `kind` against."""
    tree = ast.parse(Path(device_socket.__file__).read_text(encoding="utf-8"))
    reader = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "serve_frames"
    )
    return {
        comparator.value
        for node in ast.walk(reader)
        if isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Name)
        and node.left.id == "kind"
        for comparator in node.comparators
        if isinstance(comparator, ast.Constant) and isinstance(comparator.value, str)
    }


def test_the_frame_finders_see_the_frames() -> None:
    """The scans below find what they should (else they would pass on nothing)."""
    assert {"ready", "error", "decision_result", "passcode_seed"} <= _frame_types_built(
        Path(device_socket.__file__)
    )
    assert {"ack", "decision", "passcode_seed_ack", "auth"} <= _frame_types_accepted()
    assert {"status", "delivered", "result"} <= _frame_types_built(Path(browser.__file__))


@pytest.mark.parametrize(
    "frame_type",
    sorted(
        _frame_types_built(Path(device_socket.__file__))
        | set(device_socket.FORWARDED_EVENTS)
        | _frame_types_accepted()
        | _frame_types_built(Path(browser.__file__))
    ),
)
def test_every_socket_frame_is_in_the_contract(frame_type: str) -> None:
    assert f'{{"type":"{frame_type}"' in DOC, f"docs/protocol.md does not show {frame_type!r}"


def test_every_addition_is_listed_with_its_reason() -> None:
    differences = _section("Differences from PROTOCOL.md v1")
    assert differences.count("\n| ") > 20
    for member in ("`reason`", "`requester`", "`context.details`", "`confirm`", "`webpush`"):
        assert member in differences, member
