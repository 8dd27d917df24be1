"""Schema migrations through Alembic's command API, usable from sync code and inside a loop."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

import app
from alembic import command
from app.settings import Settings

# The package is installed editable from the repository, whose root holds alembic/.
REPO_ROOT = Path(app.__file__).resolve().parent.parent
ALEMBIC_DIR = REPO_ROOT / "alembic"

# Alembic keeps its migration context in module globals, so one process runs one migration at
# a time; other processes are kept apart by env.py (advisory lock / lock file).
_in_process = threading.Lock()


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that needs no alembic.ini and writes nothing to stdout."""
    if not (ALEMBIC_DIR / "env.py").is_file():
        raise RuntimeError(f"Alembic scripts not found at {ALEMBIC_DIR}")
    # stdout stays clean for `tapprove --json`; Alembic's own messages go to stderr.
    config = Config(stdout=sys.stderr)
    # Config values go through configparser interpolation, hence the doubled percent signs.
    config.set_main_option("script_location", str(ALEMBIC_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    script = ScriptDirectory(str(ALEMBIC_DIR))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("no Alembic revisions found")
    return head


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate the configured database up to `revision` (blocks until done)."""
    config = alembic_config(settings.sqlalchemy_url)
    _outside_event_loop(lambda: command.upgrade(config, revision))


def downgrade(settings: Settings, revision: str) -> None:
    """Migrate the configured database down to `revision` (`base` empties it)."""
    config = alembic_config(settings.sqlalchemy_url)
    _outside_event_loop(lambda: command.downgrade(config, revision))


async def upgrade_async(settings: Settings, revision: str = "head") -> None:
    """Like `upgrade`, without blocking the running event loop."""
    await asyncio.to_thread(upgrade, settings, revision)


async def downgrade_async(settings: Settings, revision: str) -> None:
    """Like `downgrade`, without blocking the running event loop."""
    await asyncio.to_thread(downgrade, settings, revision)


def _outside_event_loop(action: Callable[[], None]) -> None:
    def locked() -> None:
        with _in_process:
            action()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        locked()
        return
    # env.py drives the async engine with asyncio.run(), which cannot nest in a running loop.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alembic") as pool:
        pool.submit(locked).result()
