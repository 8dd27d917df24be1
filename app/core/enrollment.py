"""The enrollment link a phone opens or scans: `tapprove://enroll?url=<PUBLIC_URL>&code=<code>`."""

from __future__ import annotations

from urllib.parse import quote


def enrollment_uri(public_url: str, code: str) -> str:
    """Build the link for `code` on the server at `public_url` (both percent-encoded)."""
    return f"tapprove://enroll?url={quote(public_url, safe='')}&code={quote(code, safe='')}"
