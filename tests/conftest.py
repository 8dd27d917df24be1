"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py, loaded here."""

pytest_plugins = [
    "tests.fixtures.providers",
    "tests.fixtures.services",
    "tests.fixtures.cluster",
    "tests.fixtures.app",
    "tests.fixtures.processes",
    "tests.fixtures.db",
    "tests.fixtures.mail",
    "tests.fixtures.browser",
]
