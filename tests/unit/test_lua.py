"""Every Redis script is a `.lua` file with a header naming its KEYS and ARGV, and every
caller passes exactly those names: checked here by reading the files and the Python that
calls them, without running anything."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.store.lua import Script, parse_header, read

APP = Path(__file__).resolve().parents[2] / "app"
LUA_FILES = sorted(APP.rglob("scripts/*.lua"))


def package_and_name(path: Path) -> tuple[str, str]:
    package = ".".join(path.parent.parent.relative_to(APP.parent).parts)
    return package, path.stem


def code_of(text: str) -> str:
    """The Lua without comments and string literals (what a name or operator could be in)."""
    text = re.sub(r"--[^\n]*", "", text)
    return re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", "''", text)


def test_there_are_scripts_and_no_lua_is_left_in_python() -> None:
    assert len(LUA_FILES) >= 20
    for path in APP.rglob("*.py"):
        text = path.read_text()
        for marker in ("redis.call(", "register_script(", "KEYS[", "ARGV["):
            assert marker not in text or path.name == "lua.py", f"{marker} in {path}"


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_a_script_uses_its_names_and_builds_none(path: Path) -> None:
    text = path.read_text()
    header = parse_header(text, str(path))
    code = code_of(text)
    assert "KEYS[" not in code and "ARGV[" not in code, "use the header's names"
    for name in (*header.keys, *header.argv):
        assert re.search(rf"\b{name}\b", code), f"{name} is declared but never used"
    # Concatenation is how a script would build a key or channel name: none may.
    assert ".." not in code, "no string building: keys come in KEYS, channels in ARGV"
    for included in header.includes:
        assert read(*included.split("/", 1)).header.library, included


def script_calls(tree: ast.AST) -> tuple[dict[str, tuple[str, str]], list[ast.Call]]:
    """`self.x = Script(redis, package, name)` assignments, and every call of a `self.x`."""
    scripts: dict[str, tuple[str, str]] = {}
    calls: list[ast.Call] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "Script"
        ):
            target = node.targets[0]
            assert isinstance(target, ast.Attribute), ast.unparse(node)
            package, name = (ast.literal_eval(arg) for arg in node.value.args[1:3])
            scripts[target.attr] = (package, name)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            calls.append(node)
    return scripts, calls


def names_of(argument: ast.expr, tree: ast.AST) -> tuple[str, ...]:
    """The names a call passes: a dict literal, or a call of a method of the same module
    that returns one (`self._create_keys(...)`)."""
    if isinstance(argument, ast.Call) and isinstance(argument.func, ast.Attribute):
        method = argument.func.attr
        defined = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == method
        ]
        assert len(defined) == 1, method
        returned = [node.value for node in ast.walk(defined[0]) if isinstance(node, ast.Return)]
        assert len(returned) == 1 and returned[0] is not None, method
        argument = returned[0]
    assert isinstance(argument, ast.Dict), f"pass a dict literal: {ast.unparse(argument)[:60]}"
    return tuple(ast.literal_eval(key) for key in argument.keys if key is not None)


def test_every_caller_passes_the_names_its_script_declares() -> None:
    used: set[tuple[str, str]] = set()
    for path in APP.rglob("*.py"):
        tree = ast.parse(path.read_text())
        scripts, calls = script_calls(tree)
        for call in calls:
            if not isinstance(call.func, ast.Attribute):
                continue
            called = call.func
            if called.attr == "replicated" and isinstance(called.value, ast.Attribute):
                called = called.value  # `self.x.replicated(keys, args, ...)`: x's names
            if called.attr not in scripts:
                continue
            package, name = scripts[called.attr]
            header = read(package, name).header
            where = f"{path.name}: {ast.unparse(call)[:80]}"
            assert names_of(call.args[0], tree) == header.keys, where
            assert names_of(call.args[1], tree) == header.argv, where
            used.add((package, name))
    scripts_on_disk = {
        package_and_name(path)
        for path in LUA_FILES
        if not parse_header(path.read_text()).library
    }
    assert used == scripts_on_disk, "every script is called, and called with its names"


def test_a_call_with_names_out_of_order_is_refused_before_redis_sees_it() -> None:
    script = Script(aioredis.Redis(), "app.store", "ratelimit_hit")
    with pytest.raises(TypeError, match="takes KEYS"):
        # Not awaited far: the names are checked before anything is sent.
        script({"counter": "k"}, {"window": 1, "limit": 1, "cost": 1}).send(None)


def test_a_header_needs_keys_and_argv_and_usable_names() -> None:
    assert parse_header("-- Does a thing.\n-- KEYS: a b\n-- ARGV: c\nreturn 1").argv == ("c",)
    assert parse_header("-- library: f\nlocal function f() end").library
    for bad in (
        "-- KEYS: a\nreturn 1",
        "-- KEYS: a\n-- ARGV: a\nreturn 1",
        "-- KEYS: end\n-- ARGV:\nreturn 1",
        "-- library: f\n-- KEYS: a\nlocal function f() end",
    ):
        with pytest.raises(ValueError):
            parse_header(bad)
