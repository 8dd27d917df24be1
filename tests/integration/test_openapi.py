"""`GET /openapi.json` against the running app: a valid OpenAPI 3.1 document that lists every
HTTP route, and only routes that exist, with the body models the handlers parse.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route, WebSocketRoute

from app.web.openapi import OPERATIONS
from tests.fixtures.app import LiveServer

pytestmark = pytest.mark.timeout(60)

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def route_table(server: LiveServer) -> tuple[set[tuple[str, str]], set[str]]:
    """(METHOD, /path/{param}) of every HTTP route the app serves, and its WebSocket paths."""
    http: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for route in server.app.routes:
        if isinstance(route, WebSocketRoute):
            sockets.add(_PARAM.sub(r"{\1}", route.path))
        elif isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    http.add((method, _PARAM.sub(r"{\1}", route.path)))
    return http, sockets


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


async def openapi(server: LiveServer) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    found: dict[str, Any] = response.json()
    return found


async def test_the_document_is_valid_openapi_3_1(server: LiveServer) -> None:
    doc = await openapi(server)

    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": server.settings.public_url}]
    validate(doc)  # raises with the offending location if it is not valid


async def test_every_route_is_documented_and_every_documented_route_exists(
    server: LiveServer,
) -> None:
    doc = await openapi(server)
    http, sockets = route_table(server)

    assert documented(doc) == http
    assert set(doc["x-websockets"]) == sockets
    missing = sorted(http - set(OPERATIONS))
    assert not missing, f"add these routes to OPERATIONS in app/web/openapi.py: {missing}"
    assert set(OPERATIONS) <= http, "OPERATIONS names routes the app does not have"


async def test_every_documented_call_is_answered_by_its_route_with_a_documented_status(
    server: LiveServer,
) -> None:
    doc = await openapi(server)
    browser = server.browser()

    for path, item in doc["paths"].items():
        for method, operation in item.items():
            url = _PARAM.sub("0123456789abcdef0123456789abcdef", path)
            body = {} if "requestBody" in operation else None
            response = await browser.request(method.upper(), url, json=body)
            where = f"{method.upper()} {path} -> {response.status_code} {response.text[:200]}"

            assert response.status_code != 405, where
            if response.status_code == 404 and response.headers.get("content-type", "").startswith(
                "application/json"
            ):
                assert not response.json()["message"].startswith("no such route"), where
            assert str(response.status_code) in operation["responses"], where


async def test_request_bodies_are_the_models_the_handlers_parse(server: LiveServer) -> None:
    doc = await openapi(server)
    schemas = doc["components"]["schemas"]

    for (method, path), spec in OPERATIONS.items():
        operation = doc["paths"][path][method.lower()]
        if spec.body is None:
            assert "requestBody" not in operation, (method, path)
            continue
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[-1]
        assert name == spec.body.__name__
        assert set(schemas[name]["properties"]) == set(spec.body.model_fields), name

    login = schemas["LoginBody"]
    assert set(login["required"]) == {"email", "password"}
    assert login["properties"]["remember_browser"]["type"] == "boolean"
    enroll = schemas["EnrollBody"]
    assert enroll["properties"]["platform"]["enum"] == ["android", "ios", "web"]
    answers = doc["paths"]["/api/login"]["post"]["responses"]
    assert {"200", "202", "401", "403", "422", "423", "429", "503"} <= set(answers)
