"""Keep credentials out of everything stored.

Headers are handled by allowlists (only known-harmless headers are ever stored); this module
removes secrets that turn up inside bodies, such as the masked key the API quotes back in a
401 message, or the caller's own key echoed somewhere. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"

# API keys (`sk-...`, `sk-proj-...`, masked forms with `*`), bearer tokens, org/project ids.
_PATTERNS = re.compile(
    rb"sk-[A-Za-z0-9_*\-]{6,}"
    rb"|Bearer\s+[A-Za-z0-9._~+/*\-]{8,}=*"
    rb"|\borg-[A-Za-z0-9]{8,}"
    rb"|\bproj_[A-Za-z0-9]{8,}"
)

CREDENTIAL_HEADERS = ("authorization", "api-key", "openai-organization", "openai-project",
                      "cookie", "x-replay-auth")


def secret_values(headers: dict[str, str]) -> list[bytes]:
    """The literal credential values a client sent, so they can be searched for in bodies."""
    values: list[bytes] = []
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name, "").strip()
        if name == "authorization" and value.lower().startswith("bearer "):
            value = value[7:].strip()
        if len(value) >= 6:
            values.append(value.encode())
    return values


def scrub(data: bytes, secrets: Iterable[bytes] = ()) -> bytes:
    for secret in secrets:
        data = data.replace(secret, REDACTED.encode())
    return _PATTERNS.sub(REDACTED.encode(), data)


def scrub_text(text: str, secrets: Iterable[bytes] = ()) -> str:
    return scrub(text.encode(), secrets).decode("utf-8", "replace")
