"""The approval package stays readable and keeps its keys to itself: no function in it is
longer than a screen, and no other module spells an approval key's name (only
app/approval/keys.py does, and the store is the only user of those)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
KEYS_MODULE = APP / "approval" / "keys.py"
MAX_LINES = 50

# What an approval key or channel name looks like: `approval:<id>`, `approvals:deadlines`,
# `user:<id>:pending` / `:fatigue`, an approval's `:acks`, `:inflight`, `:waiters`.
_KEY_TEXT = re.compile(r"approvals?:(?!\s)|\S:(acks|inflight|waiters|pending|fatigue)\b")
_KEY_PARTS = {"approval", "approvals", "pending", "fatigue", "acks", "inflight", "waiters"}


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_function_of_the_approval_package_is_over_fifty_lines() -> None:
    long = [
        f"{path.name}:{fn.name} ({(fn.end_lineno or fn.lineno) - fn.lineno + 1} lines)"
        for path in sorted((APP / "approval").rglob("*.py"))
        for fn in functions(ast.parse(path.read_text()))
        if (fn.end_lineno or fn.lineno) - fn.lineno + 1 > MAX_LINES
    ]
    assert not long, long


def key_names_in(tree: ast.AST) -> list[str]:
    """String literals that spell approval key names, and calls that build one from parts
    (`space.in_shard(shard, "approval", id)`, `keys("user", id, "pending")`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _KEY_TEXT.search(node.value):
                found.append(node.value)
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            parts = {a.value for a in node.args if isinstance(a, ast.Constant)}
            if name in ("in_shard", "keys", "space") and parts & _KEY_PARTS:
                found.append(ast.unparse(node))
    return found


def test_only_the_keys_module_spells_approval_keys() -> None:
    assert key_names_in(ast.parse(KEYS_MODULE.read_text())), "the check sees the keys module"
    spelled = {
        str(path.relative_to(APP)): names
        for path in sorted(APP.rglob("*.py"))
        if path != KEYS_MODULE and (names := key_names_in(ast.parse(path.read_text())))
    }
    assert not spelled, spelled


def test_the_check_would_see_a_key_built_elsewhere() -> None:
    built = ast.parse('k = svc.keys("approval", approval_id, "acks")\nf"{p}approval:{i}"')
    assert len(key_names_in(built)) == 2
