"""The OpenAPI 3.1 document, built from the app's own route table so it cannot drift."""

from __future__ import annotations

import re
from typing import Any

from starlette.routing import Mount, Route

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def _operations() -> list[tuple[str, str, str]]:
    from app.main import all_routes

    found: list[tuple[str, str, str]] = []
    for route in all_routes():
        if isinstance(route, Route) and route.path.startswith(
            ("/api", "/healthz", "/readyz", "/metrics", "/openapi", "/verify")
        ):
            for method in sorted(route.methods or ()):
                if method == "HEAD":
                    continue
                doc = (route.endpoint.__doc__ or "").strip().splitlines()
                found.append((route.path, method.lower(), doc[0] if doc else route.name))
        elif isinstance(route, Mount):
            continue
    return found


def document(public_url: str) -> dict[str, Any]:
    """OpenAPI 3.1: every HTTP route with its path parameters and error shape."""
    paths: dict[str, dict[str, Any]] = {}
    for path, method, summary in _operations():
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(path)
        ]
        plain = _PARAM.sub(r"\1", path).strip("/").replace("/", "_")
        error_schema = {"schema": {"$ref": "#/components/schemas/Error"}}
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": f"{method}_{plain}",
            "responses": {
                "default": {
                    "description": "An error",
                    "content": {"application/json": error_schema},
                }
            },
        }
        if params:
            operation["parameters"] = params
        paths.setdefault(_PARAM.sub(r"{\1}", path), {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "tapprove", "version": "1"},
        "servers": [{"url": public_url}],
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                }
            }
        },
    }
