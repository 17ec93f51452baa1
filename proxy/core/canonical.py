"""The canonical form of a request and the key derived from it.

Two requests that would get the same answer from the provider must map to the same key, and
any change that could change the answer must change it. Pure: no I/O.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from enum import StrEnum
from typing import Any, TypedDict, cast

import multipart  # type: ignore[import-untyped]
import orjson

from .errors import ProxyError
from .providers import Provider, Route
from .rules import Normaliser, Rules

# Fields that never change what the model answers: end-user ids, tags, storage opt-ins and
# cache-routing hints. Users can move a field either way with --ignore-field / --match-field.
DEFAULT_IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "safety_identifier", "prompt_cache_key",
})
# Headers that select a different API behaviour. Everything else (credentials, User-Agent,
# the SDK's x-stainless-* retry and runtime headers) is left out of the key.
DEFAULT_MATCHED_HEADERS = frozenset({"openai-beta"})
NEVER_IGNORED = frozenset({"seed", "model", "messages", "input", "prompt", "stream"})
# Query parameters that carry a credential: Azure's and API Management's keys, OAuth tokens and
# codes, signed-URL signatures, generic keys and secrets. None of them changes the answer, so
# they are left out of the key and the stored request (and so out of every message built from
# it) and only forwarded upstream. Compared case-insensitively, `_` and `-` alike.
CREDENTIAL_QUERY_PARAMS = frozenset({
    "api-key", "apikey", "key", "subscription-key", "ocp-apim-subscription-key",
    "access-token", "id-token", "refresh-token", "token", "code", "client-secret",
    "sig", "signature", "password", "secret", "auth",
})

_MAX_SAFE_INT = 2**53


class BodyKind(StrEnum):
    """A body that is not JSON is keyed by what it is, under a top-level `body_kind` that no JSON
    body can set: an upload and a JSON body shaped like its canonical form never share a key.
    JSON bodies carry no `body_kind`, so their keys are what they always were."""

    MULTIPART = "multipart"
    BYTES = "bytes"


BODY_MULTIPART = BodyKind.MULTIPART
BODY_BYTES = BodyKind.BYTES
# Limits on one part's headers: generous next to what clients send (a name, a file name, a
# type), small next to --max-body.
_MAX_PART_HEADER = 16 * 1024
_MAX_PART_HEADERS = 16


class CanonicalRequest(TypedDict, total=False):
    """The normalised request the key is computed over, and what an entry stores as its
    `request`. `keyed_request` sets every field but `body_kind` (set only for a body that is not
    JSON); every field is optional all the same, because a stored request is read from a file
    (whose fields are checked, not required) and a normalise hook need only keep `method` and
    `route`."""

    provider: Provider
    method: str
    route: str
    deployment: str | None
    api_version: str | None
    query: list[list[str]]  # sorted [name, value] pairs, without api-version and credentials
    headers: dict[str, str]  # the keyed headers only (KeyPolicy.matched_headers)
    body: Any  # the JSON body as keyed (rules applied), or a multipart or binary body's digest
    body_kind: str  # a BodyKind; absent for JSON and for no body


class MultipartPart(TypedDict, total=False):
    """One part of a multipart body as keyed: a text field by its `value`, a file (or a value
    that is not UTF-8) by the `sha256` and `size` of its bytes."""

    name: str
    value: str
    content_type: str | None
    sha256: str
    size: int


@dataclass(frozen=True)
class KeyPolicy:
    """How a request becomes its key: the top-level fields left out, the headers kept, the
    matching rules (masks, ignored paths, redactions), and a Python hook for what no rule
    expresses, run after the rules, the same way when recording and when matching."""

    ignored_fields: frozenset[str] = DEFAULT_IGNORED_FIELDS
    matched_headers: frozenset[str] = DEFAULT_MATCHED_HEADERS
    rules: Rules = field(default_factory=Rules)
    normalise: Normaliser | None = None

    @classmethod
    def build(cls, ignore: tuple[str, ...] = (), match: tuple[str, ...] = (),
              match_headers: tuple[str, ...] = (), rules: Rules | None = None,
              normalise: Normaliser | None = None) -> KeyPolicy:
        refused = sorted(set(ignore) & NEVER_IGNORED)
        if refused:
            raise ValueError(
                f"--ignore-field cannot drop {', '.join(refused)}: it changes the answer, so it "
                "always takes part in the key."
            )
        fields = (DEFAULT_IGNORED_FIELDS | set(ignore)) - set(match)
        headers = DEFAULT_MATCHED_HEADERS | {h.lower() for h in match_headers}
        return cls(frozenset(fields), frozenset(headers), rules or Rules(), normalise)


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    route: Route
    query: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    extra: Mapping[str, Any] = field(default_factory=dict)


def is_credential_param(name: str) -> bool:
    return name.strip().lower().replace("_", "-") in CREDENTIAL_QUERY_PARAMS


def credential_values(query: Iterable[tuple[str, str]]) -> list[str]:
    """The values of a query's credential parameters, to scrub from anything stored."""
    return [value for name, value in query if is_credential_param(name)]


@dataclass(frozen=True)
class Keyed:
    """A request as keyed: the canonical form the key is computed over (matching rules and the
    normalise hook applied: what is stored), and what the rules changed, for explanations."""

    canonical: CanonicalRequest
    key: str
    changed: Mapping[tuple[str | int, ...], Any]  # body location -> its value before the rules
    dropped: tuple[str, ...]  # ignored paths that removed something from this body


def keyed_request(request: IncomingRequest, policy: KeyPolicy) -> Keyed:
    route = request.route
    query = sorted((k, v) for k, v in request.query
                   if k != "api-version" and not is_credential_param(k))
    headers = {
        name: request.headers[name] for name in sorted(policy.matched_headers)
        if name in request.headers
    }
    body, kind = canonical_body(request, policy)
    changed: Mapping[tuple[str | int, ...], Any] = {}
    dropped: tuple[str, ...] = ()
    if kind is None and policy.rules:
        applied = policy.rules.apply(body)
        body, changed, dropped = applied.body, applied.changed, applied.dropped
    canonical: CanonicalRequest = {
        "provider": route.provider,
        "method": request.method.upper(),
        "route": route.route,
        "deployment": route.deployment,
        "api_version": route.api_version,
        "query": [list(pair) for pair in query],
        "headers": headers,
        "body": body,
    }
    if kind is not None:
        canonical["body_kind"] = kind
    if policy.normalise is not None:
        canonical = _normalised(policy.normalise, canonical)
    return Keyed(canonical, request_key(canonical), changed, dropped)


def _normalised(normalise: Normaliser, canonical: CanonicalRequest) -> CanonicalRequest:
    """The user's hook, given a copy; what it returns must still be a JSON-ready request."""
    try:
        result = normalise(orjson.loads(orjson.dumps(canonical)))
        orjson.dumps(result)
    except Exception as exc:
        raise ProxyError(
            f"The normalise hook {getattr(normalise, '__qualname__', normalise)!r} failed on "
            f"this request ({exc.__class__.__name__}: {exc}); fix it or remove it from "
            "replay_config.", status=500, type="server_error", code="normalise_failed",
        ) from exc
    if not isinstance(result, dict) or not {"method", "route"} <= set(result):
        raise ProxyError(
            f"The normalise hook {getattr(normalise, '__qualname__', normalise)!r} must return "
            "the canonical request it was given (a dict with method, route, body, ...), "
            "changed where it should be.", status=500, type="server_error",
            code="normalise_failed")
    return cast(CanonicalRequest, result)


def canonical_request(request: IncomingRequest, policy: KeyPolicy) -> CanonicalRequest:
    """The JSON-ready description of a request that the key is computed over."""
    return keyed_request(request, policy).canonical


def request_key(canonical: CanonicalRequest) -> str:
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


def canonical_body(request: IncomingRequest, policy: KeyPolicy
                   ) -> tuple[Any, BodyKind | None]:
    """(the keyed form of the body, its `body_kind`: None for JSON and for no body)."""
    body = decoded_body(request.body, request.headers.get("content-encoding"))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        if request.route.expects_json and request.method.upper() == "POST":
            raise ProxyError(
                f"The request body is empty; POST {request.route.route} takes a JSON object.",
                code="empty_body",
            )
        return None, None
    if content_type == "multipart/form-data":
        return multipart_parts(body, request.headers.get("content-type", "")), BODY_MULTIPART
    is_json_type = content_type == "application/json" or content_type.endswith("+json")
    if request.route.expects_json and not is_json_type:
        shown = content_type or "none"
        raise ProxyError(
            f"Content-Type is {shown}; POST {request.route.route} takes application/json.",
            status=415 if content_type else 400, code="invalid_content_type",
        )
    if not is_json_type:
        return {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                "content_type": content_type or None}, BODY_BYTES
    parsed = parse_json_body(body)
    if isinstance(parsed, dict):
        return {
            name: normalise_value(value) for name, value in parsed.items()
            if value is not None and name not in policy.ignored_fields
        }, None
    return normalise_value(parsed), None


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


def multipart_parts(body: bytes, content_type: str) -> list[MultipartPart]:
    """Key a multipart/form-data body by its parts, in order of name (repeated names keep their
    order). A text field by its value; a file, or a value that is not UTF-8, by the sha256 of its
    bytes, never its file name: two different files never share a key, a renamed one does."""
    boundary = _boundary(content_type)
    parts: list[MultipartPart] = []
    segment: Any = None  # the part being read: its headers
    content: list[bytes] = []
    try:
        parser = multipart.PushMultipartParser(
            boundary, max_header_size=_MAX_PART_HEADER, max_header_count=_MAX_PART_HEADERS)
        # An empty chunk ends the input: a body cut before its closing boundary is an error.
        for event in itertools.chain(parser.parse(body), parser.parse(b"")):
            if isinstance(event, multipart.MultipartSegment):
                segment, content = event, []
            elif event is not None:
                content.append(event)
            else:
                parts.append(_part(segment, b"".join(content)))
    except multipart.MultipartError as exc:
        raise ProxyError(f"The multipart/form-data body could not be read: {exc}.",
                         code="invalid_multipart") from exc
    parts.sort(key=lambda part: str(part["name"]))
    return parts


def _part(segment: Any, content: bytes) -> MultipartPart:
    part: MultipartPart = {"name": segment.name}
    declared_type = segment.header("Content-Type")
    if segment.filename is None and not _names_a_file(segment.header("Content-Disposition", "")):
        try:
            part["value"] = content.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if declared_type is not None:
                part["content_type"] = declared_type
            return part
    part.update({"sha256": hashlib.sha256(content).hexdigest(), "size": len(content),
                 "content_type": declared_type})
    return part


def _names_a_file(disposition: str) -> bool:
    """Whether a Content-Disposition names a file in any form, `filename*=` (RFC 5987/2231)
    included, which the multipart parser leaves aside."""
    header = Message()
    header["content-disposition"] = disposition
    return header.get_param("filename", header="content-disposition") is not None


def _boundary(content_type: str) -> str:
    _, options = multipart.parse_options_header(content_type)
    boundary = options.get("boundary", "")
    # RFC 2046: 1 to 70 characters, all printable ASCII; anything else is refused here rather
    # than fail in the parser (a boundary=\xe9 arrives as a surrogate escape).
    if not boundary or len(boundary) > 70 or not all(" " <= char <= "~" for char in boundary):
        shown = "missing" if not boundary else f"{boundary!r} is not valid"
        raise ProxyError(f"multipart/form-data needs a boundary parameter of 1 to 70 printable "
                         f"ASCII characters ({shown}).", code="invalid_multipart")
    return str(boundary)
