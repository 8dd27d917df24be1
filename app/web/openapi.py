"""The OpenAPI 3.1 document, built from the app's own route table so it cannot drift.

Paths, methods and path parameters come from the routes; what the route table cannot know
(request body, typed answers per status, who may call) each handler declares with
`@answers(...)` (app.web.contract), next to the pydantic models it answers with. Request
and response schemas are those models' JSON schemas. A route without a declaration is still
listed, and tests/integration/test_openapi.py fails until it has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.routing import BaseRoute, Route, WebSocketRoute

from app.web.contract import JSON, Error, Operation, Reply, Schema, declared_operation

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_REF = "#/components/schemas/{model}"

_STR: Schema = {"type": "string"}

SECURITY_SCHEMES: dict[str, Schema] = {
    "session": {"type": "apiKey", "in": "cookie", "name": "tapprove_session"},
    "loginCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "tapprove_login",
        "description": "Binds a browser to the approval its sign-in started",
    },
    "deviceToken": {"type": "http", "scheme": "bearer", "description": "The device token"},
    "apiKey": {"type": "http", "scheme": "bearer", "description": "A relying-party API key"},
}


def _ref(name: str) -> Schema:
    return {"$ref": _REF.format(model=name)}


@dataclass(frozen=True)
class HttpRoute:
    """One method of one HTTP route, as the route table has it, with what its handler declared."""

    method: str
    path: str  # OpenAPI form: /api/login/{approval_id}
    summary: str
    tag: str
    operation: Operation | None


def http_routes(routes: Sequence[BaseRoute]) -> list[HttpRoute]:
    """Every HTTP method of every route (HEAD and mounts left out: the static files, and the
    Duo Auth API, which is not JSON and is described in docs/duo-compat.md)."""
    found: list[HttpRoute] = []
    for route in routes:
        if not isinstance(route, Route):
            continue  # WebSocket routes and mounts
        doc = (route.endpoint.__doc__ or "").strip().splitlines()
        summary = doc[0].strip() if doc else route.name
        tag = route.endpoint.__module__.rsplit(".", 1)[-1]
        operation = declared_operation(route.endpoint)
        path = _PARAM.sub(r"{\1}", route.path)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append(HttpRoute(method, path, summary, tag, operation))
    return found


def websocket_paths(routes: Sequence[BaseRoute]) -> list[str]:
    return [_PARAM.sub(r"{\1}", r.path) for r in routes if isinstance(r, WebSocketRoute)]


def _content(reply: Reply) -> dict[str, Any]:
    schema = _ref(reply.model.__name__) if reply.model is not None else reply.schema
    return {reply.media: {"schema": schema}} if schema is not None else {}


def _responses(operation: Operation) -> dict[str, Any]:
    replies: dict[int, Reply | str] = dict(operation.replies)
    if operation.body is not None:
        replies.setdefault(413, "too_large: the body exceeds 64 KiB")
        replies.setdefault(422, "invalid_request: malformed JSON or a missing or invalid field")
    if operation.store:
        replies.setdefault(503, "unavailable: Redis or the database is down; retry shortly")
    out: dict[str, Any] = {}
    for status in sorted(replies):
        reply = replies[status]
        if isinstance(reply, str):
            reply = Reply(reply, Error)
        entry: dict[str, Any] = {"description": reply.description}
        content = _content(reply)
        if content:
            entry["content"] = content
        headers: dict[str, Any] = {name: {"schema": _STR} for name in reply.headers}
        if status in (429, 503):
            headers["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds"}
        if headers:
            entry["headers"] = headers
        out[str(status)] = entry
    out["default"] = {
        "description": "Any other error, in the one error shape",
        "content": {JSON: {"schema": _ref(Error.__name__)}},
    }
    return out


def _operation(route: HttpRoute, spec: Operation | None) -> dict[str, Any]:
    words = re.sub(r"[^A-Za-z0-9]+", "_", route.path).strip("_") or "root"
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{words}",
        "tags": [route.tag],
    }
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _STR}
        for name in _PARAM.findall(route.path)
    ]
    spec = spec or Operation({})
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": q.schema,
        }
        for q in spec.query
    ]
    if parameters:
        operation["parameters"] = parameters
    if spec.description:
        operation["description"] = spec.description
    if spec.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": _ref(spec.body.__name__)}},
        }
    if spec.auth:
        operation["security"] = [{name: []} for name in spec.auth]
    operation["responses"] = _responses(spec)
    return operation


def _schemas(specs: Sequence[Operation]) -> dict[str, Schema]:
    """The JSON schemas of every request body (as parsed) and answer (as serialized)."""
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Error, "serialization"): None}
    for spec in specs:
        if spec.body is not None:
            models[(spec.body, "validation")] = None
        for reply in spec.replies.values():
            if isinstance(reply, Reply) and reply.model is not None:
                models[(reply.model, "serialization")] = None
    ordered = sorted(models, key=lambda pair: (pair[0].__name__, pair[1]))
    _, defs = models_json_schema(ordered, ref_template=_REF)
    found: dict[str, Schema] = defs.get("$defs", {})
    return found


def document(public_url: str, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """OpenAPI 3.1: every HTTP route of `routes` (the app's table, passed in by whoever
    serves the document) with its parameters, request body and answers."""
    paths: dict[str, dict[str, Any]] = {}
    declared: list[Operation] = []
    for route in http_routes(routes):
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, route.operation)
        if route.operation is not None:
            declared.append(route.operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tapprove",
            "version": "1",
            "description": "Self-hosted push login approval. The contract, with the WebSocket "
            "frames, JWS claims, push payloads, CLI and settings that OpenAPI cannot "
            "describe, is docs/protocol.md in the repository; WebSocket paths are listed "
            "under `x-websockets`. Members and answers beyond PROTOCOL.md v1 are marked "
            "there and listed in its section 9.",
        },
        "servers": [{"url": public_url}],
        "paths": paths,
        "components": {
            "schemas": _schemas(declared),
            "securitySchemes": SECURITY_SCHEMES,
        },
        "x-websockets": websocket_paths(routes),
    }
