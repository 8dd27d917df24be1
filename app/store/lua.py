"""Redis Lua scripts: one `.lua` file each, shipped as package data beside the code that
calls it (`<package>/scripts/<name>.lua`). This module is the one place they are read.

A script file begins with its header: comment lines saying what it does and naming its
inputs in the order callers pass them, for example

    -- KEYS: counter
    -- ARGV: limit window cost
    -- include: app.store/schedule

The loader binds those names as locals ahead of the body, so a body never indexes `KEYS`
or `ARGV`. `include` puts a library file first: a file whose header says `-- library:`
and which only defines local functions shared by several scripts (they take their keys as
arguments). Every key a script touches comes in its KEYS (Redis Cluster refuses anything
else) and channel names come in ARGV: no script builds a name (tests/unit/test_lua.py).
Callers pass `keys` and `args` as dicts in header order; each call checks the names.

Scripts publish with `redis.call(PUBLISH, channel, message)`: the loader sets `PUBLISH` to
`SPUBLISH` on a Redis Cluster (sharded pub/sub: the event goes only to the shard that owns
the channel's slot, which is the script's own, as channels carry the keys' hash tag) and
to `PUBLISH` on a single server (the embedded redis-server 6.2 has no SPUBLISH).
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from app.store.redis import is_cluster

Arg = str | bytes | int | float

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Lua's reserved words and the globals scripts use: not usable as the name of an input.
_LUA_WORDS = frozenset(
    {
        *("and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto"),
        *("if", "in", "local", "nil", "not", "or", "repeat", "return", "then", "true"),
        *("until", "while", "redis", "cjson", "table", "string", "math", "tonumber"),
        *("tostring", "ipairs", "pairs", "unpack", "type", "next", "KEYS", "ARGV"),
    }
)


@dataclass(frozen=True)
class Header:
    """What a script's leading comment lines declare."""

    keys: tuple[str, ...]
    argv: tuple[str, ...]
    includes: tuple[str, ...]  # "package/name" of library files, in order
    library: bool  # a library file: functions for other scripts, never run alone


@dataclass(frozen=True)
class LuaFile:
    """One `.lua` file: its header, its body, and (for a script) the source Redis runs."""

    package: str
    name: str
    header: Header
    body: str
    source: str


def parse_header(text: str, where: str = "script") -> Header:
    """The header of a `.lua` file's text; ValueError names what is wrong with it."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        word, colon, rest = line[2:].strip().partition(":")
        if colon and word in ("KEYS", "ARGV", "include", "library"):
            # A long list may go on over several lines of the same kind.
            found.setdefault(word, []).extend(rest.split())
    library = "library" in found
    if not library and not ("KEYS" in found and "ARGV" in found):
        raise ValueError(f"{where}: the header must have a KEYS and an ARGV line")
    if library and ("KEYS" in found or "ARGV" in found):
        raise ValueError(f"{where}: a library takes its keys as function arguments")
    names = [*found.get("KEYS", []), *found.get("ARGV", [])]
    for name in names:
        if not _NAME.match(name) or name in _LUA_WORDS:
            raise ValueError(f"{where}: {name!r} is not a usable Lua name")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a name appears twice among KEYS and ARGV")
    return Header(
        tuple(found.get("KEYS", [])),
        tuple(found.get("ARGV", [])),
        tuple(found.get("include", [])),
        library,
    )


def _bind(kind: str, names: tuple[str, ...]) -> str:
    if not names:
        return ""
    values = ", ".join(f"{kind}[{i}]" for i in range(1, len(names) + 1))
    return f"local {', '.join(names)} = {values}\n"


@functools.cache
def read(package: str, name: str) -> LuaFile:
    """The file `<package>/scripts/<name>.lua`, with its includes resolved."""
    text = importlib.resources.files(package).joinpath(f"scripts/{name}.lua").read_text()
    header = parse_header(text, f"{package}/{name}.lua")
    libraries = []
    for included in header.includes:
        library = read(*included.split("/", 1))
        if not library.header.library:
            raise ValueError(f"{package}/{name}.lua includes {included}, not a library")
        libraries.append(library.source)
    prologue = _bind("KEYS", header.keys) + _bind("ARGV", header.argv)
    return LuaFile(package, name, header, text, "".join([*libraries, prologue, text]))


def publish_command(sharded: bool) -> str:
    """The line that names the publish command scripts use (see the module's docstring)."""
    return f"local PUBLISH = '{'SPUBLISH' if sharded else 'PUBLISH'}'\n"


class Script:
    """A script registered on a client; called with its KEYS and ARGV by name."""

    __slots__ = ("_redis", "_registered", "lua", "source")

    def __init__(self, redis: aioredis.Redis, package: str, name: str) -> None:
        self.lua = read(package, name)
        if self.lua.header.library:
            raise ValueError(f"{package}/{name}.lua is a library, not a script")
        self._redis = redis
        self.source = publish_command(is_cluster(redis)) + self.lua.source
        self._registered = redis.register_script(self.source)

    def _check(self, keys: Mapping[str, str], args: Mapping[str, Arg]) -> None:
        header = self.lua.header
        if tuple(keys) != header.keys or tuple(args) != header.argv:
            raise TypeError(
                f"{self.lua.package}/{self.lua.name}.lua takes KEYS {header.keys} and "
                f"ARGV {header.argv}, given {tuple(keys)} and {tuple(args)}"
            )

    async def __call__(
        self,
        keys: Mapping[str, str],
        args: Mapping[str, Arg],
        *,
        client: aioredis.Redis | Pipeline | None = None,
    ) -> Any:
        self._check(keys, args)
        if client is None and is_cluster(self._redis):
            names, values = list(keys.values()), list(args.values())
            try:
                return await self._redis.evalsha(self._registered.sha, len(names), *names, *values)
            except NoScriptError:
                # The node of this slot never ran it (a replica promoted since). EVAL runs and
                # caches it there; redis-py's SCRIPT LOAD would go to every master, and fail
                # while one of them is down.
                return await self._redis.eval(self.source, len(names), *names, *values)
        return await self._registered(
            keys=list(keys.values()), args=list(args.values()), client=client
        )

    async def replicated(
        self, keys: Mapping[str, str], args: Mapping[str, Arg], *, replicas: int, wait_ms: int
    ) -> tuple[Any, int]:
        """Run the script, then `WAIT replicas wait_ms` on the same connection: its result
        and how many replicas acknowledged its writes (WAIT counts this connection's writes
        only, so both go down one connection: on a cluster, the node of the first key)."""
        self._check(keys, args)
        if replicas <= 0:
            return await self(keys, args), 0
        names, values = list(keys.values()), list(args.values())
        cluster = is_cluster(self._redis)
        for cached in (True, False):
            async with self._redis.pipeline(transaction=False) as pipe:
                if not cluster:
                    await self._registered(keys=names, args=values, client=pipe)
                    pipe.execute_command("WAIT", replicas, wait_ms)
                else:
                    node = self._redis.get_node_from_key(names[0])  # type: ignore[attr-defined]
                    if cached:
                        pipe.evalsha(self._registered.sha, len(names), *names, *values)
                    else:  # the node never ran it (see __call__)
                        pipe.eval(self.source, len(names), *names, *values)
                    pipe.execute_command("WAIT", replicas, wait_ms, target_nodes=node)
                try:
                    result, acked = await pipe.execute()
                except NoScriptError:
                    if not (cluster and cached):
                        raise
                    continue
            return result, int(acked)
        raise AssertionError("unreachable")
