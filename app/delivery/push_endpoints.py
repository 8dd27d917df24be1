"""Which Web Push endpoints the server may send to: the SSRF guard.

A Web Push endpoint is a URL the phone's browser hands us, so a client chooses where the
server sends requests. The server only sends to `https` URLs on port 443 whose host ends in
one of the allowed push-service suffixes (TAPPROVE_WEBPUSH_ALLOWED_HOSTS), never follows a
redirect (app.delivery.webpush), and connects only to public addresses: `GuardedResolver`
is the resolver of the sending connection, so the address checked is the address connected
to (no second lookup that DNS rebinding could answer differently).

Tests add loopback `IP:port` services over plain http (TAPPROVE_WEBPUSH_TEST_ENDPOINTS),
which Settings accepts only in test mode.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from app.settings import Settings

MAX_ENDPOINT_LENGTH = 2048
# What a push service's URL is made of (RFC 3986 unreserved, sub-delims, ':', '/', '?', '%').
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:/?%\[\]]+")
# Labels of letters, digits and inner hyphens; the last starts with a letter, so no name is
# read as a number ("2130706433", "0x7f.1") by a resolver that accepts those as addresses.
_HOST_NAME = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


class EndpointRefused(OSError):
    """An endpoint the server will not send to, with the reason in words.

    An OSError, so that raised from the connection's resolver it ends the connection
    attempt the way a failed DNS lookup does; the sender tells the two apart.
    """


@dataclass(frozen=True)
class Endpoint:
    """A checked endpoint, in the parts the sender rebuilds its request URL from (nothing
    parses the client's string again, so no two URL parsers can disagree about the host)."""

    scheme: str
    host: str
    port: int
    path: str
    query: str

    @property
    def origin(self) -> str:
        """The push service's origin: the VAPID `aud` claim (RFC 8292 §2)."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


@dataclass(frozen=True)
class EndpointPolicy:
    """The allowed host suffixes, and the loopback services tests may use over http."""

    allowed_hosts: tuple[str, ...]
    test_services: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> EndpointPolicy:
        tests: set[tuple[str, int]] = set()
        if settings.test_mode:  # Settings refuses test endpoints outside test mode, too
            for entry in (settings.webpush_test_endpoints or "").split(","):
                host, _, port = entry.strip().rpartition(":")
                if host:
                    tests.add((str(ipaddress.ip_address(host.strip("[]"))), int(port)))
        return cls(settings.webpush_hosts, frozenset(tests))

    def host_allowed(self, host: str) -> bool:
        """Whether `host` is one of the suffixes or below one (`a.notify.windows.com`)."""
        return any(host == suffix or host.endswith("." + suffix) for suffix in self.allowed_hosts)

    def check(self, url: str) -> Endpoint:
        """The endpoint `url` names if the server may send to it; EndpointRefused if not."""
        if len(url) > MAX_ENDPOINT_LENGTH:
            raise EndpointRefused(f"longer than {MAX_ENDPOINT_LENGTH} characters")
        if "@" in url:
            raise EndpointRefused("user information is not allowed")
        if not _URL_CHARACTERS.fullmatch(url):  # no '#', '\\', spaces, controls, non-ASCII
            raise EndpointRefused("not a plain URL")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise EndpointRefused("not a valid URL") from None
        host = parts.hostname or ""
        literal = _ip_literal(host)
        if parts.scheme == "http" or literal is not None:
            return self._test_service(parts.scheme, literal, port, parts.path, parts.query)
        if parts.scheme != "https":
            raise EndpointRefused("only https endpoints are allowed")
        if port not in (None, 443):
            raise EndpointRefused("only port 443 is allowed")
        if not _HOST_NAME.fullmatch(host):
            raise EndpointRefused("not a valid host name")
        if not self.host_allowed(host):
            raise EndpointRefused(f"{host} is not an allowed push service")
        return Endpoint("https", host, 443, parts.path or "/", parts.query)

    def _test_service(
        self, scheme: str, address: str | None, port: int | None, path: str, query: str
    ) -> Endpoint:
        """An http or IP-address endpoint: only a configured test service qualifies."""
        if address is None:
            raise EndpointRefused("only https endpoints are allowed")
        if scheme != "http" or port is None or (address, port) not in self.test_services:
            raise EndpointRefused("an IP address is not an allowed push service")
        return Endpoint("http", address, port, path or "/", query)


def _ip_literal(host: str) -> str | None:
    """The normalised address if `host` is an IP literal (`127.0.0.1`, `::1`), else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public_address(address: str) -> bool:
    """Whether `address` is a public unicast address (not private, loopback, link-local,
    shared, reserved, multicast or unspecified). An IPv6 address that carries an IPv4 one
    (mapped, NAT64, 6to4, Teredo) must pass as that IPv4 address too."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    judged: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            judged.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        judged += [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
        judged += list(ip.teredo or ())
    return all(a.is_global and not a.is_multicast for a in judged)


class GuardedResolver(AbstractResolver):
    """The sending connection's resolver: every address it returns is public, or it refuses.

    One non-public answer refuses the whole name: a push service never mixes private
    addresses into its public records, and an attacker's name might.
    """

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        refused = [a["host"] for a in answers if not public_address(a["host"])]
        if refused:
            raise EndpointRefused(f"{host} resolves to a non-public address ({refused[0]})")
        return answers

    async def close(self) -> None:
        await self._resolver.close()
