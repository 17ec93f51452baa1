"""What a recording is and how one key's recordings are written to, and read from, a file.

One file per key: the format version, the canonical request, whether the recordings are a
sequence, the pinned fingerprint and the recordings, pretty-printed with the request first and
every other key sorted, so that a diff of a cassette reads well in review. Bodies are stored so
that replay gives back the exact bytes the upstream sent. Pure: no I/O.

Format 2 added `sequence`; format 1 files (which have none) still load, as alternatives.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

import orjson

from .canonical import CanonicalRequest, is_credential_param
from .errors import CassetteError, ProxyError
from .providers import parse_route, validate_deployment
from .sse import event_data

FORMAT_VERSION = 2
READABLE_FORMATS = frozenset({1, 2})

# Response headers worth replaying. Everything else (cookies, organisation ids, rate-limit
# counters, dates) is dropped before storage.
REPLAYED_HEADERS = frozenset({
    "content-type", "openai-model", "openai-version", "openai-processing-ms", "x-request-id",
    "retry-after", "apim-request-id", "azureml-model-deployment",
    "openai-poll-after-ms",  # how long the SDK's polling helpers wait before asking again
})


class Drift(StrEnum):
    """How a fresh answer compared with what its key had recorded (refresh, verify)."""

    SAME = "same"
    FINGERPRINT = "drift:fingerprint"  # the backend configuration changed
    OUTPUT = "drift:output"  # same seed and fingerprint, different answer


@dataclass(frozen=True)
class SseEvent:
    at_ms: float  # time since the request was sent upstream
    raw: bytes  # the event exactly as sent, blank-line terminator included


@dataclass(frozen=True)
class Recording:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    events: tuple[SseEvent, ...] | None = None
    system_fingerprint: str | None = None
    model: str | None = None
    recorded_at: str = ""
    usage: dict[str, Any] | None = None
    duration_ms: float = 0.0
    drift: Drift | None = None  # set by refresh and verify --update
    verified_at: str | None = None  # the last refresh or verify that got this same answer

    @property
    def is_stream(self) -> bool:
        return self.events is not None


@dataclass(frozen=True)
class Entry:
    """Everything stored under one key of one cassette.

    `sequence` says how the recordings are replayed: in order, the n-th identical request of a
    session getting the n-th (a stateful route), or as alternatives chosen by fingerprint.
    """

    key: str
    label: str
    request: CanonicalRequest
    recordings: tuple[Recording, ...] = ()
    pinned_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sequence: bool = False
    # The matching rules the request was keyed under (`Rules.describe()`): shown when a replay
    # under other rules misses it. Never compiled: a cassette is untrusted input.
    rules: dict[str, list[str]] = field(default_factory=dict)

    def add(self, recording: Recording) -> Entry:
        """One more alternative; the first recording's fingerprint is pinned."""
        pinned = recording.system_fingerprint if not self.recordings else self.pinned_fingerprint
        return replace(self, recordings=(*self.recordings, recording), pinned_fingerprint=pinned,
                       sequence=False)

    def as_sequence(self, recordings: tuple[Recording, ...]) -> Entry:
        return replace(self, recordings=recordings, pinned_fingerprint=None, sequence=True)

    def last_confirmed(self) -> str:
        """When an answer of this key was last recorded or confirmed by an identical one (ISO
        time; empty when none says)."""
        return max((max(recording.recorded_at, recording.verified_at or "")
                    for recording in self.recordings), default="")

    def verified(self, recording: Recording, at: str) -> Entry:
        """`recording` (one of this entry's) was confirmed by an identical fresh answer at `at`:
        noted on it, rather than stored again."""
        recordings = tuple(replace(kept, verified_at=at) if kept is recording else kept
                           for kept in self.recordings)
        return replace(self, recordings=recordings)

    def fingerprints(self) -> list[str | None]:
        seen: list[str | None] = []
        for recording in self.recordings:
            if recording.system_fingerprint not in seen:
                seen.append(recording.system_fingerprint)
        return seen


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_entry(entry: Entry) -> bytes:
    # What was asked comes first, what was answered last; keys are sorted elsewhere for stable
    # diffs, except inside stored bodies, whose key order is part of the bytes replay returns.
    events: list[list[dict[str, Any]]] = []
    recordings = []
    mark = f"events-{uuid.uuid4().hex}-{{}}"  # unguessable, so no stored string can be taken for it
    for recording in entry.recordings:
        # An event's data, like a body, keeps its key order: it is part of the replayed bytes.
        encoded = sort_keys(_encode_recording(recording), keep={"body", "events"})
        if "events" in encoded:
            events.append(encoded["events"])
            encoded["events"] = mark.format(len(events) - 1)
        recordings.append(encoded)
    document: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "key": entry.key,
        "label": entry.label,
        "request": sort_keys(entry.request),
        **({"extra": sort_keys(entry.extra)} if entry.extra else {}),
        "sequence": entry.sequence,
        **({"rules": sort_keys(entry.rules)} if entry.rules else {}),
        "pinned_fingerprint": entry.pinned_fingerprint,
        "recordings": recordings,
    }
    text = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    # A stream is one line per event: a changed token is one changed line in a review, and the
    # file stays smaller than the events' raw text (whose JSON would be escaped).
    for index, stream in enumerate(events):
        lines = b",\n        ".join(orjson.dumps(event) for event in stream)
        laid_out = b"[\n        " + lines + b"\n      ]" if stream else b"[]"
        placeholder = orjson.dumps(mark.format(index))
        assert text.count(placeholder) == 1
        text = text.replace(placeholder, laid_out)
    return text


def sort_keys(value: Any, keep: frozenset[str] | set[str] = frozenset()) -> Any:
    """A copy with dict keys sorted at every level, leaving the values under `keep` untouched."""
    if isinstance(value, dict):
        return {name: value[name] if name in keep else sort_keys(value[name], keep)
                for name in sorted(value)}
    if isinstance(value, list):
        return [sort_keys(item, keep) for item in value]
    return value


def decode_entry(raw: bytes, source: str) -> Entry:
    """Parse a stored file, checking every rule of the format (see SECURITY.md): what a file
    holds is input from whoever last edited it. Any problem is a CassetteError naming `source`
    and what to do about it; nothing else is ever raised."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CassetteError(
            f"Cassette file {source} is not valid JSON ({exc}). Restore it from version control "
            "or delete it to record again; other recordings are unaffected."
        ) from exc
    if not isinstance(document, dict):
        raise CassetteError(f"Cassette file {source} does not hold a JSON object.")
    version = document.get("format")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CassetteError(
            f"Cassette file {source} uses format {version}, newer than this replay-proxy "
            f"understands (format {FORMAT_VERSION}). Upgrade replay-proxy "
            "(pip install -U replay-proxy) to read it.",
            code="cassette_format_unsupported",
        )
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_FORMATS:
        raise CassetteError(f"Cassette file {source} has no valid format version "
                            f"({_show(version)}).")
    try:
        return _decode_document(document)
    except (_Invalid, KeyError, TypeError, ValueError, OverflowError, RecursionError,
            binascii.Error) as exc:
        # _Invalid names the rule broken; the others are a safety net, so that no input can
        # raise anything but a CassetteError.
        why = str(exc) if isinstance(exc, _Invalid) else f"a malformed field ({exc!r:.200})"
        raise CassetteError(
            f"Cassette file {source} is corrupt or was edited into a shape replay-proxy never "
            f"writes: {why}. Restore it from version control, or delete it to record again; "
            "other recordings are unaffected."
        ) from exc


def _encode_recording(recording: Recording) -> dict[str, Any]:
    encoded: dict[str, Any] = {
        "status": recording.status,
        "headers": recording.headers,
        "system_fingerprint": recording.system_fingerprint,
        "model": recording.model,
        "recorded_at": recording.recorded_at,
        "duration_ms": round(recording.duration_ms, 3),
    }
    if recording.usage is not None:
        encoded["usage"] = recording.usage
    if recording.drift is not None:
        encoded["drift"] = recording.drift
    if recording.verified_at is not None:
        encoded["verified_at"] = recording.verified_at
    if recording.events is not None:
        encoded["events"] = [_encode_event(event) for event in recording.events]
    else:
        encoded.update(encode_body(recording.body))
    return encoded


# The shape of nearly every event the APIs send: an optional name line, one line of compact JSON.
_EVENT = re.compile(rb"(?:event: ([A-Za-z0-9_.\-]+)\n)?data: (\{.*\})\n\n", re.S)


def _event_text(name: str | None, data: object) -> bytes:
    head = f"event: {name}\n".encode() if name is not None else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _encode_event(event: SseEvent) -> dict[str, Any]:
    """An event as parsed JSON (`{"at_ms", "event"?, "data"}`) when encoding that again gives back
    the exact bytes, so that a stream reads like a JSON answer in review; else its raw text."""
    at_ms = round(event.at_ms, 3)
    shaped = _EVENT.fullmatch(event.raw)
    if shaped is not None:
        try:
            data = orjson.loads(shaped.group(2))
        except orjson.JSONDecodeError:
            data = None
        name = shaped.group(1).decode() if shaped.group(1) is not None else None
        if isinstance(data, dict) and _event_text(name, data) == event.raw:
            return {"at_ms": at_ms, **({"event": name} if name is not None else {}),
                    "data": data}
    try:
        return {"at_ms": at_ms, "raw": event.raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"at_ms": at_ms, "raw_base64": base64.b64encode(event.raw).decode()}


# JSON layouts we can reproduce byte for byte from the parsed value.
_JSON_LAYOUTS = {"json": 0, "json-indent": orjson.OPT_INDENT_2}


def encode_body(body: bytes) -> dict[str, Any]:
    """Store JSON as JSON (readable in review) whenever the exact bytes can be rebuilt."""
    stripped = body.rstrip(b"\n")
    suffix = body[len(stripped):].decode()
    if stripped[:1] in (b"{", b"["):
        try:
            parsed = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            parsed = None
        if parsed is not None:
            for layout, option in _JSON_LAYOUTS.items():
                if orjson.dumps(parsed, option=option) == stripped:
                    encoded: dict[str, Any] = {"body_encoding": layout, "body": parsed}
                    if suffix:
                        encoded["body_suffix"] = suffix
                    return encoded
    try:
        return {"body_encoding": "text", "body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_encoding": "base64", "body": base64.b64encode(body).decode()}


def decode_body(item: dict[str, Any], where: str = "body") -> bytes:
    """The exact bytes of a stored body. Raises ValueError when the fields are malformed."""
    encoding = item.get("body_encoding", "text")
    value = item.get("body", "")
    if not isinstance(encoding, str):
        raise _Invalid(f"{where}_encoding: {_show(encoding)} is not an encoding's name")
    if encoding in _JSON_LAYOUTS:
        if not isinstance(value, (dict, list)):  # encode_body stores only these as JSON
            raise _Invalid(f"{where}: a JSON body is an object or a list")
        suffix = item.get("body_suffix", "")
        if not isinstance(suffix, str) or suffix.strip("\n"):
            raise _Invalid(f"{where}_suffix: only newlines may follow a JSON body")
        return orjson.dumps(value, option=_JSON_LAYOUTS[encoding]) + suffix.encode()
    if encoding == "text":
        return _string(value, where).encode("utf-8")
    if encoding == "base64":
        return _base64(value, where)
    raise _Invalid(f"{where}_encoding: unknown encoding {_show(encoding)} (json, json-indent, "
                   "text or base64)")


# ---- reading a stored document: every rule a file must keep to be loaded ---------------------
# A file is input from whoever edited it last (cassettes arrive in pull requests), so nothing in
# it is used before it is checked: names that become paths, what replay sends as headers and
# status, the pacing of a stream, and the type of every field the proxy reads.

MAX_AT_MS = 24 * 3600 * 1000.0  # an event a day into its stream is no recording
# orjson writes documents nested up to this depth and no deeper, so a file nested deeper was not
# written by replay-proxy; the bound also keeps every later walk over a request or body shallow.
MAX_DEPTH = 254
MAX_TOKENS = 2**53
_KEY = re.compile(r"[0-9a-f]{64}")
# What `Route.label` produces: file-name safe, and never `.`, `..` or a hidden file.
_LABEL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,59}")
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,100}")
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]{0,4096}")  # tab allowed, no CR/LF/NUL
_WHOLE_MS = re.compile(r"[0-9]{1,10}")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")
# Request headers that would change how a re-sent request is framed or where it goes (`verify`).
_REQUEST_HEADERS_REFUSED = frozenset({"host", "content-length", "transfer-encoding",
                                      "connection", "upgrade", "te", "trailer", "expect"})
# Statuses after which HTTP sends no body: a stream with one would write its events unframed.
_BODILESS = frozenset({204, 304})


class _Invalid(ValueError):
    """A rule a stored document breaks: `where: why`."""


def is_key(value: object) -> bool:
    """Whether `value` is a key as replay-proxy computes them: 64 lowercase hex digits."""
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def is_label(value: object) -> bool:
    """Whether `value` can be the label in a stored file's name (`chat.completions`)."""
    return isinstance(value, str) and _LABEL.fullmatch(value) is not None


def _decode_document(document: dict[str, Any]) -> Entry:
    _check_depth(document)
    key = document.get("key")
    if not is_key(key):
        raise _Invalid(f"key: {_show(key)} is not a key (64 lowercase hex digits)")
    label = document.get("label")
    if not is_label(label):
        raise _Invalid(f"label: {_show(label)} is not a label (1 to 60 letters, digits and "
                       "'_ - .', not starting with '.')")
    request = _request(document.get("request"))
    extra = _object(document.get("extra", {}), "extra")
    if "path" in extra:
        _api_path(extra["path"])
    sequence = document.get("sequence", False)
    if not isinstance(sequence, bool):
        raise _Invalid(f"sequence: {_show(sequence)} is not true or false")
    rules = _rules(document.get("rules", {}))
    pinned = _optional_string(document.get("pinned_fingerprint"), "pinned_fingerprint")
    items = document.get("recordings")
    if not isinstance(items, list):
        raise _Invalid(f"recordings: {_show(items)} is not a list")
    recordings = tuple(_recording(item, f"recordings[{index}]")
                       for index, item in enumerate(items))
    assert isinstance(key, str) and isinstance(label, str)
    return Entry(key=key, label=label, request=request, recordings=recordings,
                 pinned_fingerprint=pinned, extra=extra, sequence=sequence, rules=rules)


_RULE_KINDS = frozenset({"mask", "ignore_path", "redact"})
# In `extra`: the matching rules changed the stored request (it holds placeholders, or lacks an
# ignored field), so it is not the request that was sent.
RULES_CHANGED = "rules_changed_request"


def _rules(value: object) -> dict[str, list[str]]:
    """`{"mask": [...], "ignore_path": [...], "redact": [...]}`: a few short strings each."""
    rules = _object(value, "rules")
    checked: dict[str, list[str]] = {}
    for kind, written in rules.items():
        if kind not in _RULE_KINDS:
            raise _Invalid(f"rules: {_show(kind)} is not a kind of rule "
                           f"({', '.join(sorted(_RULE_KINDS))})")
        if not isinstance(written, list) or len(written) > 64 or not all(
                isinstance(rule, str) and 0 < len(rule) <= 1024 for rule in written):
            raise _Invalid(f"rules.{kind}: {_show(written)} is not a list of up to 64 rules")
        checked[kind] = list(written)
    return checked


def _request(value: object) -> CanonicalRequest:
    """The canonical request: read by miss explanations, `ls`, and `verify` (which sends it)."""
    request = _object(value, "request")
    provider = request.get("provider")
    if provider is not None and provider not in ("openai", "azure"):
        raise _Invalid(f"request.provider: {_show(provider)} is neither openai nor azure")
    method = request.get("method")
    if method is not None and not (isinstance(method, str) and _METHOD.fullmatch(method)):
        raise _Invalid(f"request.method: {_show(method)} is not an HTTP method")
    _optional_string(request.get("route"), "request.route")
    _optional_string(request.get("api_version"), "request.api_version")
    _optional_string(request.get("body_kind"), "request.body_kind")
    deployment = _optional_string(request.get("deployment"), "request.deployment")
    if deployment is not None:
        try:
            validate_deployment(deployment)
        except ProxyError as exc:
            raise _Invalid(f"request.deployment: {exc.message}") from None
    query = request.get("query", [])
    if not isinstance(query, list):
        raise _Invalid(f"request.query: {_show(query)} is not a list of [name, value] pairs")
    for index, pair in enumerate(query):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(part, str) for part in pair)):
            raise _Invalid(f"request.query[{index}]: {_show(pair)} is not a [name, value] pair")
        if is_credential_param(pair[0]):
            # Stored by a replay-proxy older than the rule that leaves credentials out of keys:
            # the key can never match again, and the file holds a secret.
            raise _Invalid(f"request.query[{index}]: the credential parameter {pair[0]!r} is "
                           "stored here (remove the file, and revoke the credential it holds)")
    headers = _object(request.get("headers", {}), "request.headers")
    for name, header in headers.items():
        where = f"request.headers[{_show(name)}]"
        if not _HEADER_NAME.fullmatch(name) or name in _REQUEST_HEADERS_REFUSED:
            raise _Invalid(f"{where}: not a header a request is keyed by")
        _header_value(header, where)
    return cast(CanonicalRequest, request)


def _recording(value: object, where: str) -> Recording:
    item = _object(value, where)
    status = item.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise _Invalid(f"{where}.status: {_show(status)} is not a status from 200 to 599")
    headers = _object(item.get("headers"), f"{where}.headers")
    for name, header in headers.items():
        if name not in REPLAYED_HEADERS:
            raise _Invalid(f"{where}.headers: {_show(name)} is not a header replay-proxy replays "
                           f"(only {', '.join(sorted(REPLAYED_HEADERS))}, in lower case)")
        _header_value(header, f"{where}.headers[{name!r}]")
        if name == "openai-poll-after-ms" and not _WHOLE_MS.fullmatch(header):
            raise _Invalid(f"{where}.headers['openai-poll-after-ms']: {_show(header)} is not "
                           "a whole number of milliseconds")
    events = None
    body = b""
    if "events" in item:
        if status in _BODILESS:
            raise _Invalid(f"{where}: a stream cannot have status {status}, which has no body")
        stream = item["events"]
        if not isinstance(stream, list):
            raise _Invalid(f"{where}.events: {_show(stream)} is not a list")
        events = tuple(_event(event, f"{where}.events[{index}]")
                       for index, event in enumerate(stream))
    else:
        body = decode_body(item, f"{where}.body")
    usage = item.get("usage")
    if usage is not None:
        usage = _object(usage, f"{where}.usage")
        tokens = usage.get("total_tokens")
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)
                                   or not 0 <= tokens <= MAX_TOKENS):
            raise _Invalid(f"{where}.usage.total_tokens: {_show(tokens)} is not a count of "
                           "tokens")
    drift = item.get("drift")
    if drift is not None and drift not in [member.value for member in Drift]:
        raise _Invalid(f"{where}.drift: {_show(drift)} is not one of "
                       f"{', '.join(member.value for member in Drift)}")
    return Recording(
        status=status,
        headers=headers,
        body=body,
        events=events,
        system_fingerprint=_optional_string(item.get("system_fingerprint"),
                                            f"{where}.system_fingerprint"),
        model=_optional_string(item.get("model"), f"{where}.model"),
        recorded_at=_string(item.get("recorded_at", ""), f"{where}.recorded_at"),
        usage=usage,
        duration_ms=_number(item.get("duration_ms", 0.0), f"{where}.duration_ms", math.inf),
        drift=Drift(drift) if drift is not None else None,
        verified_at=_optional_string(item.get("verified_at"), f"{where}.verified_at"),
    )


def _event(value: object, where: str) -> SseEvent:
    item = _object(value, where)
    at_ms = _number(item.get("at_ms"), f"{where}.at_ms", MAX_AT_MS)
    if "data" in item:
        data = item["data"]
        if not isinstance(data, dict):
            raise _Invalid(f"{where}.data: an event's data must be a JSON object")
        name = item.get("event")
        if name is not None and not (isinstance(name, str) and _EVENT_NAME.fullmatch(name)):
            raise _Invalid(f"{where}.event: {_show(name)} is not an event name")
        raw = _event_text(name, data)
    elif "raw_base64" in item:
        raw = _base64(item["raw_base64"], f"{where}.raw_base64")
    else:
        raw = _string(item.get("raw"), f"{where}.raw").encode("utf-8")
    return SseEvent(at_ms=at_ms, raw=raw)


def _api_path(value: object) -> str:
    """`extra.path`, which `verify` appends to the upstream's URL: an API path that routes to
    itself, so that it can never name another host."""
    path = _string(value, "extra.path")
    refused = ("?", "#", "\\", "//", " ", "\t")
    try:
        route = parse_route(path, {}) if not any(part in path for part in refused) else None
    except ProxyError:
        route = None
    if route is None or route.upstream_path != path or not _HEADER_VALUE.fullmatch(path):
        raise _Invalid(f"extra.path: {_show(path)} is not an OpenAI or Azure OpenAI API path")
    return path


def _check_depth(document: object) -> None:
    try:
        # orjson refuses to write exactly what is nested deeper than MAX_DEPTH, and does it in C:
        # a tenth of the walk below for a streamed answer, on every cassette read.
        orjson.dumps(document)
        return
    except orjson.JSONEncodeError:
        pass  # too deep, or another value it cannot write: the walk decides which
    pending: list[tuple[object, int]] = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise _Invalid(f"the document is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            pending += [(child, depth + 1) for child in value.values()
                        if isinstance(child, (dict, list))]
        elif isinstance(value, list):
            pending += [(child, depth + 1) for child in value if isinstance(child, (dict, list))]


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: {_show(value)} is not a JSON object")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where}: {_show(value)} is not a string")
    return value


def _optional_string(value: object, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _number(value: object, where: str, highest: float) -> float:
    """A finite number from 0 to `highest`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value) or not 0 <= value <= highest:
        bound = "" if highest == math.inf else f" to {highest:.0f}"
        raise _Invalid(f"{where}: {_show(value)} is not a number from 0{bound}")
    return float(value)


def _base64(value: object, where: str) -> bytes:
    text = _string(value, where)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: text that is not ASCII
        raise _Invalid(f"{where}: not valid base64 ({exc})") from None


def _header_value(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
        raise _Invalid(f"{where}: {_show(value)} is not a header value (a string of at most "
                       "4096 characters without control characters)")
    return value


def _show(value: object) -> str:
    """A value as an error message quotes it: short, and never a whole body."""
    try:
        text = orjson.dumps(value).decode() if isinstance(value, (dict, list)) \
            else repr(value[:61] if isinstance(value, str) else value)
    except TypeError:  # nested too deep to write
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def describe_payload(body: bytes) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(system_fingerprint, model, usage) of a JSON response body, where present."""
    if not body.startswith(b"{"):
        return None, None, None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    if not isinstance(parsed, dict):
        return None, None, None
    return _describe(parsed)


def _describe(parsed: dict[str, Any]) -> tuple[str | None, str | None, dict[str, Any] | None]:
    source = parsed.get("response") if isinstance(parsed.get("response"), dict) else parsed
    assert isinstance(source, dict)
    fingerprint = source.get("system_fingerprint") or None
    model = source.get("model") if isinstance(source.get("model"), str) else None
    usage = source.get("usage") if isinstance(source.get("usage"), dict) else None
    return fingerprint, model, usage


def resource_status(recording: Recording) -> str | None:
    """The `status` field of the resource an answer describes (`in_progress`, `completed`, ...),
    which is what moves along a recorded sequence of polls."""
    if recording.events is not None or not recording.body.startswith(b"{"):
        return None
    try:
        parsed = orjson.loads(recording.body)
    except orjson.JSONDecodeError:
        return None
    status = parsed.get("status") if isinstance(parsed, dict) else None
    return status if isinstance(status, str) else None


def describe_events(events: tuple[SseEvent, ...]) -> tuple[str | None, str | None,
                                                            dict[str, Any] | None]:
    """The first non-empty fingerprint and model, and the last usage, across stream events."""
    fingerprint: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    for event in events:
        data = event_data(event.raw)
        if not data or data == b"[DONE]" or not data.startswith(b"{"):
            continue
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(parsed, dict):
            continue
        event_fingerprint, event_model, event_usage = _describe(parsed)
        fingerprint = fingerprint or event_fingerprint
        model = model or event_model
        usage = event_usage or usage
    return fingerprint, model, usage
