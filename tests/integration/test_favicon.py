"""The icon: every page links the SVG icon, and `/favicon.ico` (what browsers and other
clients ask for without reading a page) answers a real .ico rather than 404."""

from __future__ import annotations

import re
import struct

import httpx
import pytest

from app.web.pages import PAGES
from tests.fixtures.app import LiveServer

pytestmark = pytest.mark.timeout(60)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def test_favicon_ico_is_an_icon(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = await client.get("/favicon.ico")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/x-icon"
    data = answer.content
    reserved, kind, count = struct.unpack("<HHH", data[:6])
    assert (reserved, kind) == (0, 1) and count >= 1  # ICONDIR of an icon (not a cursor)
    sizes = set()
    for n in range(count):
        width, _, _, _, _, _, length, offset = struct.unpack(
            "<BBBBHHII", data[6 + 16 * n : 22 + 16 * n]
        )
        assert data[offset : offset + 8] == PNG_SIGNATURE and offset + length <= len(data)
        sizes.add(width)
    assert {16, 32} <= sizes


async def test_every_page_links_the_svg_icon(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        pages = [await client.get(path) for path in PAGES]
        pages.append(await client.get("/verify-email", params={"token": "x" * 43}))
        icon = await client.get("/static/icon.svg")
    for page in pages:
        assert page.status_code == 200, page.url
        link = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page.text)
        assert link and link.group(1) == "/static/icon.svg", page.url
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
