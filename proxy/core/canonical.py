"""The canonical form of a request and the key derived from it.

Two requests that would get the same answer from the provider must map to the same key, and
any change that could change the answer must change it. Pure: no I/O.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import ProxyError
from .providers import Route

# Fields that never change what the model answers: end-user ids, tags, storage opt-ins and
# cache-routing hints. Users can move a field either way with --ignore-field / --match-field.
DEFAULT_IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "safety_identifier", "prompt_cache_key",
})
# Headers that select a different API behaviour. Everything else (credentials, User-Agent,
# the SDK's x-stainless-* retry and runtime headers) is left out of the key.
DEFAULT_MATCHED_HEADERS = frozenset({"openai-beta"})
NEVER_IGNORED = frozenset({"seed", "model", "messages", "input", "prompt", "stream"})

_MAX_SAFE_INT = 2**53


@dataclass(frozen=True)
class KeyPolicy:
    ignored_fields: frozenset[str] = DEFAULT_IGNORED_FIELDS
    matched_headers: frozenset[str] = DEFAULT_MATCHED_HEADERS

    @classmethod
    def build(cls, ignore: tuple[str, ...] = (), match: tuple[str, ...] = (),
              match_headers: tuple[str, ...] = ()) -> KeyPolicy:
        refused = sorted(set(ignore) & NEVER_IGNORED)
        if refused:
            raise ValueError(
                f"--ignore-field cannot drop {', '.join(refused)}: it changes the answer, so it "
                "always takes part in the key."
            )
        fields = (DEFAULT_IGNORED_FIELDS | set(ignore)) - set(match)
        headers = DEFAULT_MATCHED_HEADERS | {h.lower() for h in match_headers}
        return cls(frozenset(fields), frozenset(headers))


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    route: Route
    query: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    extra: Mapping[str, Any] = field(default_factory=dict)


def canonical_request(request: IncomingRequest, policy: KeyPolicy) -> dict[str, Any]:
    """The JSON-ready description of a request that the key is computed over."""
    route = request.route
    query = sorted((k, v) for k, v in request.query if k != "api-version")
    headers = {
        name: request.headers[name] for name in sorted(policy.matched_headers)
        if name in request.headers
    }
    return {
        "provider": route.provider,
        "method": request.method.upper(),
        "route": route.route,
        "deployment": route.deployment,
        "api_version": route.api_version,
        "query": [list(pair) for pair in query],
        "headers": headers,
        "body": canonical_body(request, policy),
    }


def request_key(canonical: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def decoded_body(body: bytes, content_encoding: str | None) -> bytes:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error) as exc:
        raise ProxyError(
            f"The request body says Content-Encoding: {encoding} but does not decode: {exc}.",
            code="invalid_body_encoding",
        ) from exc
    raise ProxyError(
        f"Unsupported request Content-Encoding {encoding!r}; send identity or gzip.",
        status=415, code="unsupported_content_encoding",
    )


def canonical_body(request: IncomingRequest, policy: KeyPolicy) -> Any:
    body = decoded_body(request.body, request.headers.get("content-encoding"))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        if request.route.expects_json and request.method.upper() == "POST":
            raise ProxyError(
                f"The request body is empty; POST {request.route.route} takes a JSON object.",
                code="empty_body",
            )
        return None
    if content_type == "multipart/form-data":
        return {"multipart": multipart_parts(body, request.headers.get("content-type", ""))}
    is_json_type = content_type == "application/json" or content_type.endswith("+json")
    if request.route.expects_json and not is_json_type:
        shown = content_type or "none"
        raise ProxyError(
            f"Content-Type is {shown}; POST {request.route.route} takes application/json.",
            status=415 if content_type else 400, code="invalid_content_type",
        )
    if not is_json_type:
        return {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                "content_type": content_type or None}
    parsed = parse_json_body(body)
    if isinstance(parsed, dict):
        return {
            name: normalise_value(value) for name, value in parsed.items()
            if value is not None and name not in policy.ignored_fields
        }
    return normalise_value(parsed)


def parse_json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyError(
                "The request body is not valid UTF-8; JSON bodies must be UTF-8 encoded.",
                code="invalid_json",
            ) from exc
        raise ProxyError(
            f"We could not parse the JSON body of your request ({exc}). Send a valid JSON object.",
            code="invalid_json",
        ) from exc


def normalise_value(value: Any) -> Any:
    """Numbers compare by value (`1.0` == `1`); containers are walked."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < _MAX_SAFE_INT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {name: normalise_value(item) for name, item in value.items()}
    if isinstance(value, list):
        return [normalise_value(item) for item in value]
    return value


def multipart_parts(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """Key a multipart/form-data body by its parts; a file part by its content, not its name."""
    boundary = _boundary(content_type)
    delimiter = b"--" + boundary
    parts: list[dict[str, Any]] = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n")
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ProxyError("A multipart part has no header/body separator.", code="invalid_multipart")
        content = content.removesuffix(b"\r\n")
        headers = _part_headers(head)
        disposition = headers.get("content-disposition", "")
        name = _disposition_param(disposition, "name")
        if name is None:
            raise ProxyError("A multipart part has no name.", code="invalid_multipart")
        if _disposition_param(disposition, "filename") is not None:
            parts.append({"name": name, "sha256": hashlib.sha256(content).hexdigest(),
                          "size": len(content), "content_type": headers.get("content-type")})
        else:
            parts.append({"name": name, "value": content.decode("utf-8", "replace")})
    parts.sort(key=lambda part: (part["name"], orjson.dumps(part, option=orjson.OPT_SORT_KEYS)))
    return parts


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    raise ProxyError("multipart/form-data without a boundary parameter.", code="invalid_multipart")


def _part_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


def _disposition_param(disposition: str, wanted: str) -> str | None:
    for param in disposition.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == wanted:
            return value.strip().strip('"')
    return None
