"""OWASP ASVS 6.2.6 / 6.2.7 as SECURITY.md claims them: the login and registration pages take
the password in a `type=password` field that password managers may fill (an `autocomplete`
hint, no `autocomplete=off`), and nothing on the pages stops pasting into it."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx

from tests.fixtures.app import LiveServer


class Page(HTMLParser):
    """The inputs, scripts and inline event handlers of one served page."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str | None]] = []
        self.scripts: list[str] = []
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.handlers += [name for name in found if name.startswith("on")]
        if tag == "input":
            self.inputs.append(found)
        if tag == "script" and found.get("src"):
            self.scripts.append(str(found["src"]))


async def test_password_fields_take_managers_and_pasting(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for path, hint in (("/", "current-password"), ("/register", "new-password")):
            page = Page()
            page.feed((await client.get(path)).text)
            [password] = [i for i in page.inputs if i.get("name") == "password"]
            assert password.get("type") == "password", password
            assert password.get("autocomplete") == hint, password
            assert page.handlers == [], page.handlers  # no inline onpaste and the like
            assert page.scripts, path
            todo, seen = list(page.scripts), set()
            while todo:  # the page's scripts and every module they import
                src = todo.pop()
                if src in seen:
                    continue
                seen.add(src)
                script = await client.get(src)
                assert script.status_code == 200, src
                assert not re.search(r"\b(paste|copy|cut)\b", script.text), src
                assert 'autocomplete = "off"' not in script.text, src
                base = src.rsplit("/", 1)[0]
                for module in re.findall(r"""from\s+["']([^"']+\.js)["']""", script.text):
                    todo.append(module if module.startswith("/") else f"{base}/{module[2:]}")
            assert "/static/api.js" in seen, seen
