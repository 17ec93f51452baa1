"""Keep credentials out of everything stored, and change nothing else.

Headers are handled by allowlists (only known-harmless headers are ever stored); this module
removes secrets that turn up inside bodies, such as the masked key the API quotes back in a
401 message, or the caller's own key echoed somewhere. Pure.

What is removed, and nothing more (a replay must be the answer, byte for byte):

1. The exact credentials of the exchange: the values of the client's credential headers, and
   the proxy's own: its upstream keys and its access token.
2. Text shaped like a credential: `sk-` keys (also `sk-proj-`, `sk-svcacct-`, `sk-admin-`, and
   the masked form with `*` that a 401 quotes), `org-` and `proj_` ids, and bearer tokens. A
   shape counts only where it starts a token (no letter, digit, `_` or `-` right before it), is
   as long as real ones are, and looks random: it mixes two of upper case, lower case and
   digits, or holds a `*`. So "risk-averse", "task-oriented", "proj_manager" or
   "sk-learn-is-a-library" are left alone.

Each match becomes `[REDACTED]`; overlapping matches become one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

REDACTED = "[REDACTED]"

# A token of these shapes is a credential only if `_looks_random` says so too.
_SHAPES = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|svcacct-|admin-)?(?P<key>[A-Za-z0-9_*\-]{20,})"
    r"|org-(?P<org>[A-Za-z0-9*]{16,})"
    r"|proj_(?P<project>[A-Za-z0-9*]{16,})"
    r"|Bearer\s+(?P<token>[A-Za-z0-9._~+/*\-]{20,}=*)"
    r")"
)
_UPPER = re.compile(r"[A-Z]")
_LOWER = re.compile(r"[a-z]")
_DIGIT = re.compile(r"[0-9]")

CREDENTIAL_HEADERS = ("authorization", "api-key", "openai-organization", "openai-project",
                      "cookie", "x-replay-auth")
_MIN_SECRET = 6  # shorter values would redact ordinary words, and are no secret anyway


def secret_values(headers: Mapping[str, str], settings: Settings | None = None) -> list[bytes]:
    """The literal credential values of an exchange, so they can be searched for in bodies: what
    the client sent, and the keys the proxy itself holds (an upstream may echo the key it was
    sent, which is the proxy's own when it has one)."""
    candidates: list[str] = []
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name, "").strip()
        if name == "authorization" and value.lower().startswith("bearer "):
            value = value[7:].strip()
        candidates.append(value)
    if settings is not None:
        candidates += [settings.openai_api_key or "", settings.azure_api_key or "",
                       settings.auth_token or ""]
    values: list[bytes] = []
    for value in candidates:
        encoded = value.strip().encode()
        if len(value.strip()) >= _MIN_SECRET and encoded not in values:
            values.append(encoded)
    return values


def scrub(data: bytes, secrets: Iterable[bytes] = ()) -> bytes:
    """`data` with every credential replaced by `[REDACTED]`; bytes that hold none are kept."""
    text = data.decode("utf-8", "surrogateescape")  # round-trips any bytes exactly
    spans = credential_spans(text, _as_text(secrets))
    if not spans:
        return data
    return _redact(text, spans).encode("utf-8", "surrogateescape")


def scrub_text(text: str, secrets: Iterable[bytes] = ()) -> str:
    return scrub(text.encode(), secrets).decode("utf-8", "replace")


def credential_spans(text: str, secrets: Iterable[str] = ()) -> list[tuple[int, int]]:
    """Where credentials sit in `text`: sorted, non-overlapping (start, end) ranges."""
    spans: list[tuple[int, int]] = []
    for secret in secrets:
        if len(secret) < _MIN_SECRET:
            continue
        start = text.find(secret)
        while start >= 0:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    spans += [match.span() for match in _SHAPES.finditer(text) if _looks_random(match)]
    return _merged(spans)


def _looks_random(match: re.Match[str]) -> bool:
    body = next(group for group in match.group("key", "org", "project", "token") if group)
    if "*" in body:  # a masked key, as a 401 quotes it
        return True
    classes = sum(1 for kind in (_UPPER, _LOWER, _DIGIT) if kind.search(body))
    return classes >= 2


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _redact(text: str, spans: list[tuple[int, int]]) -> str:
    pieces: list[str] = []
    kept = 0
    for start, end in spans:
        pieces += [text[kept:start], REDACTED]
        kept = end
    pieces.append(text[kept:])
    return "".join(pieces)


def _as_text(secrets: Iterable[bytes]) -> list[str]:
    return [secret.decode("utf-8", "surrogateescape") for secret in secrets]
