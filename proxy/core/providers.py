"""OpenAI and Azure OpenAI URL layouts: which provider a path belongs to and what route it names.

Pure functions only. The server hands in the raw path and query; this module says which
upstream serves it, the normalised route used in the key, and the path to forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from .errors import ProxyError

Provider = Literal["openai", "azure"]

CASSETTE_PREFIX = "/c/"
SESSION_PREFIX = "/s/"
# Matched whole, so that no trailing newline slips through as `$` would let it.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,127}")
_MAX_NAME = 255
# Matched whole (`fullmatch`: `$` would let a trailing newline through). A name starts with a
# letter, digit or `_`, so `.` and `..` (which the upstream's URL handling would resolve into
# another route) are never a deployment.
_DEPLOYMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# Routes whose request body must be JSON; anything else under the prefixes is keyed by bytes.
JSON_ROUTES = frozenset({
    "chat/completions", "completions", "embeddings", "responses", "moderations",
    "images/generations", "audio/speech",
})


@dataclass(frozen=True)
class Route:
    provider: Provider
    route: str  # normalised, e.g. "chat/completions"
    upstream_path: str  # the path to request from the upstream, e.g. "/v1/chat/completions"
    deployment: str | None = None
    api_version: str | None = None

    @property
    def label(self) -> str:
        """A readable, file-name-safe prefix for stored files: `chat.completions`."""
        cleaned = re.sub(r"[^A-Za-z0-9_-]+", ".", self.route).strip(".")
        return (cleaned or "root")[:60]

    @property
    def expects_json(self) -> bool:
        return self.route in JSON_ROUTES


def validate_cassette_name(name: str) -> str:
    """Accept relative names of safe segments (`suite`, `tests.test_chat/test_one`).

    A name becomes a folder under the cassette root, so anything that could leave it is
    refused: empty or dot-leading segments, `..`, backslashes, absolute paths, encoded bytes.
    """
    if not name or len(name) > _MAX_NAME:
        raise _bad_name(name, "it must be 1 to 255 characters long")
    segments = name.split("/")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise _bad_name(
                name,
                "each '/'-separated part must start with a letter, digit or '_' and use only "
                "letters, digits and '_ . = + -' (no '..', no leading or doubled '/', no '%')",
            )
    return name


def _bad_name(name: str, why: str) -> ProxyError:
    shown = name if len(name) <= 80 else name[:77] + "..."
    return ProxyError(
        f"Invalid cassette name {shown!r}: {why}.",
        status=400,
        code="invalid_cassette_name",
        param="cassette",
    )


def split_cassette_prefix(path: str) -> tuple[str | None, str]:
    """`/c/<name>/v1/...` -> (name, `/v1/...`). The name ends where the API path begins."""
    if not path.startswith(CASSETTE_PREFIX):
        return None, path
    rest = path[len(CASSETTE_PREFIX):]
    match = re.search(r"(^|/)(v1|openai)(/|$)", rest)
    if match is None or match.start() == 0:
        raise ProxyError(
            f"The path {path!r} starts with {CASSETTE_PREFIX!r} but names no API route after the "
            "cassette; use /c/<cassette>/v1/... or /c/<cassette>/openai/...",
            status=400,
            code="invalid_cassette_name",
        )
    raw_name = rest[: match.start()]
    if "%" in raw_name or unquote(raw_name) != raw_name:
        raise _bad_name(raw_name, "percent-encoded characters are not allowed")
    return validate_cassette_name(raw_name), "/" + rest[match.start() + 1:]


def validate_deployment(name: str) -> str:
    """An Azure deployment name: 1 to 128 letters, digits and `_ . -`, starting with a letter,
    digit or `_`."""
    if not _DEPLOYMENT.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ProxyError(
            f"Invalid Azure deployment name {shown!r}: use 1 to 128 letters, digits and "
            "'_ . -', starting with a letter, digit or '_'.",
            status=400, code="invalid_deployment", param="deployment",
        )
    return name


def validate_session_name(name: str) -> str:
    """A session id is one safe segment: letters, digits and `_ . = + -`, 1 to 128 long."""
    if not _SEGMENT.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ProxyError(
            f"Invalid session {shown!r}: use 1 to 128 letters, digits and '_ . = + -', starting "
            "with a letter, digit or '_'.",
            status=400, code="invalid_session", param="session",
        )
    return name


def split_session_prefix(path: str) -> tuple[str | None, str]:
    """`/s/<session>/...` -> (session, `/...`): a session chosen in the base URL, for clients
    that cannot send the X-Replay-Session header."""
    if not path.startswith(SESSION_PREFIX):
        return None, path
    name, slash, rest = path[len(SESSION_PREFIX):].partition("/")
    if not slash:
        raise ProxyError(f"The path {path!r} names a session but no API route after it; use "
                         "/s/<session>/v1/... or /s/<session>/c/<cassette>/v1/...",
                         status=400, code="invalid_session")
    if "%" in name:
        raise ProxyError("Percent-encoded characters are not allowed in a session id.",
                         status=400, code="invalid_session")
    return validate_session_name(name), "/" + rest


def parse_route(path: str, query: dict[str, str]) -> Route | None:
    """Map an API path to a Route, or None when it is not an OpenAI or Azure OpenAI path.
    Raises ProxyError (400) for an Azure path whose deployment name is not valid."""
    if "%2f" in path.lower() or "/../" in path or path.endswith("/.."):
        return None
    if path.startswith("/v1/"):
        route = _normalise(path[len("/v1/"):])
        if not route:
            return None
        return Route("openai", route, "/v1/" + route)
    if path.startswith("/openai/deployments/"):
        rest = path[len("/openai/deployments/"):]
        deployment, _, tail = rest.partition("/")
        route = _normalise(tail)
        if not route or not deployment:
            return None
        validate_deployment(deployment)
        return Route(
            "azure", route, f"/openai/deployments/{deployment}/{route}",
            deployment=deployment, api_version=query.get("api-version"),
        )
    if path.startswith("/openai/v1/"):
        route = _normalise(path[len("/openai/v1/"):])
        if not route:
            return None
        return Route("azure", route, "/openai/v1/" + route, api_version=query.get("api-version"))
    if path.startswith("/openai/"):
        route = _normalise(path[len("/openai/"):])
        if not route:
            return None
        return Route("azure", route, "/openai/" + route, api_version=query.get("api-version"))
    return None


def _normalise(tail: str) -> str:
    parts = [part for part in tail.split("/") if part]
    if any(part in (".", "..") for part in parts):
        return ""
    return "/".join(parts)
