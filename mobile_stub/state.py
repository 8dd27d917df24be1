"""The device's saved state: server, identity, bearer token and private key, in a 0600 file."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mobile_stub.keys import DeviceKey

STATE_VERSION = 1
STATE_MODE = 0o600


class StateError(Exception):
    """The state file is missing, unreadable, or would be overwritten."""


@dataclass(frozen=True)
class DeviceState:
    """Everything an enrolled device needs to reconnect and sign decisions."""

    server_url: str
    device_id: str
    device_token: str
    private_key_pem: str
    user_email: str
    name: str = ""
    platform: str = ""
    # The offline-passcode seed (base32), from the enrollment answer or the socket.
    passcode_secret: str = ""

    def key(self) -> DeviceKey:
        """The device's signing key."""
        return DeviceKey.from_pem(self.private_key_pem)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to the state file."""
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: object) -> DeviceState:
        """Read a state object; StateError names the first missing or mistyped field."""
        if not isinstance(data, dict):
            raise StateError("state file does not hold a JSON object")
        if data.get("version") != STATE_VERSION:
            raise StateError(f"unsupported state file version {data.get('version')!r}")
        fields: dict[str, str] = {}
        for name in ("server_url", "device_id", "device_token", "private_key_pem", "user_email"):
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise StateError(f"state file field {name!r} is missing or not a string")
            fields[name] = value
        for name in ("name", "platform", "passcode_secret"):
            value = data.get(name, "")
            fields[name] = value if isinstance(value, str) else ""
        return cls(**fields)


def save_state(
    path: str | os.PathLike[str], state: DeviceState, *, overwrite: bool = False
) -> None:
    """Write the state file atomically with mode 0600 (it holds a bearer token and a key)."""
    target = Path(path)
    if not overwrite and target.exists():
        raise StateError(f"{target} already exists; refusing to overwrite another device's key")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    payload = json.dumps(state.to_json(), indent=2).encode("utf-8") + b"\n"
    # O_EXCL + 0600 at creation: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, STATE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), STATE_MODE)  # the umask could only remove bits, but be exact
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Fail before enrolling if the state could not be saved afterwards (the key would be lost)."""
    target = Path(path)
    if not overwrite and target.exists():
        raise StateError(f"{target} already exists; refusing to overwrite another device's key")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise StateError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise StateError(f"directory {parent} is not writable")


def load_state(path: str | os.PathLike[str]) -> DeviceState:
    """Read a state file written by `save_state`."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StateError(
            f"{target} not found; enroll first (python -m mobile_stub enroll)"
        ) from None
    except OSError as exc:
        raise StateError(f"cannot read {target}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{target} is not valid JSON: {exc}") from None
    return DeviceState.from_json(data)
