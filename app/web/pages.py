"""The browser pages (`/`, `/register`, `/account`, `/phone`), the static files they load,
`/favicon.ico` for clients that ask for it without reading a page's icon link, and what
makes `/phone` an installable app: its manifest and its service worker."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from app.web.contract import HTML, JAVASCRIPT, MANIFEST, Reply, answers

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

PAGES: dict[str, str] = {
    "/": "index.html",
    "/register": "register.html",
    "/account": "account.html",
    "/phone": "phone.html",
}


def page(path: str, filename: str) -> Route:
    """A GET route that serves one HTML file from the static directory."""

    @answers({200: Reply("The page", schema={"type": "string"}, media=HTML)}, store=False)
    async def serve(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / filename, media_type="text/html; charset=utf-8")

    return Route(path, serve, methods=["GET"], name=f"page:{filename.removesuffix('.html')}")


@answers(
    {200: Reply("The /phone app's web app manifest", schema={"type": "object"}, media=MANIFEST)},
    store=False,
)
async def phone_manifest(request: Request) -> FileResponse:
    """GET /phone/manifest.webmanifest: the /phone app's web app manifest."""
    return FileResponse(STATIC_DIR / "phone.webmanifest", media_type="application/manifest+json")


@answers(
    {200: Reply("The /phone app's service worker", schema={"type": "string"}, media=JAVASCRIPT)},
    description="Sent with `Service-Worker-Allowed: /phone`, so it controls /phone.",
    store=False,
)
async def phone_service_worker(request: Request) -> FileResponse:
    """GET /phone/sw.js: the /phone app's service worker (offline shell, Web Push).

    Served under /phone/ yet controlling `/phone` itself, which is not below /phone/: the
    header lets the page register it with scope `/phone`.
    """
    return FileResponse(
        STATIC_DIR / "phone-sw.js",
        media_type="text/javascript; charset=utf-8",
        headers={"Service-Worker-Allowed": "/phone"},
    )


@answers({200: Reply("The icon", schema={"type": "string"}, media="image/x-icon")}, store=False)
async def favicon(request: Request) -> FileResponse:
    """GET /favicon.ico: the icon as .ico (16, 32 and 48 px PNGs rendered from icon.svg)."""
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")


routes: list[BaseRoute] = [
    *(page(path, filename) for path, filename in PAGES.items()),
    Route("/favicon.ico", favicon, methods=["GET"], name="favicon"),
    Route("/phone/manifest.webmanifest", phone_manifest, methods=["GET"], name="phone-manifest"),
    Route("/phone/sw.js", phone_service_worker, methods=["GET"], name="phone-sw"),
    # check_dir=False: building the app must not fail where static/ is absent (e.g. an sdist).
    Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
]
