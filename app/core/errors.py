"""The one error type the service raises towards callers, rendered as `{"error","message"}`."""

from __future__ import annotations


class ApiError(Exception):
    """A protocol error: an HTTP status, a stable code and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, object]:
        """The JSON body: `error` and `message`, plus any extra fields (e.g. a final `status`)."""
        return {"error": self.code, "message": self.message, **self.extra}
