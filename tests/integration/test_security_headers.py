"""Every HTTP answer carries the security headers once; a route's own value wins; HSTS only
behind an https public URL."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from app.settings import Settings
from app.web.security import SecurityHeaders, content_security_policy
from tests.fixtures.app import LiveServer, ServerFactory

EXPECTED = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _once(response: httpx.Response, name: str) -> str:
    values = response.headers.get_list(name)
    assert len(values) == 1, (name, values)
    return values[0]


async def test_json_html_and_error_answers_all_carry_the_headers_once(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        answers = [
            await client.get("/healthz"),
            await client.get("/"),
            await client.get("/verify-email", params={"token": "x" * 43}),  # sets its own
            await client.get("/no/such/route"),
            await client.post("/api/v1/approvals", json={}),  # 401
        ]
    expected = {**EXPECTED, "content-security-policy": content_security_policy(server.settings)}
    for answer in answers:
        for name, value in expected.items():
            assert _once(answer, name) == value, (answer.url, name)
        assert "strict-transport-security" not in answer.headers


async def test_an_https_deployment_adds_hsts(server_factory: ServerFactory) -> None:
    server = await server_factory(public_url="https://login.example.com")
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = await client.get("/healthz")
    assert _once(answer, "strict-transport-security") == "max-age=31536000"


async def test_a_route_that_sets_one_itself_keeps_its_value() -> None:
    async def cached(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", headers={"Cache-Control": "max-age=60"})

    app = SecurityHeaders(Starlette(routes=[Route("/", cached)]), settings=Settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/")
    assert _once(answer, "cache-control") == "max-age=60"
    assert _once(answer, "x-frame-options") == "DENY"
