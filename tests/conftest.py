"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py, loaded here."""

pytest_plugins = [
    "tests.fixtures.services",
]
