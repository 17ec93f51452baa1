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
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from .errors import CassetteError
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
    request: dict[str, Any]
    recordings: tuple[Recording, ...] = ()
    pinned_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sequence: bool = False

    def add(self, recording: Recording) -> Entry:
        """One more alternative; the first recording's fingerprint is pinned."""
        pinned = recording.system_fingerprint if not self.recordings else self.pinned_fingerprint
        return replace(self, recordings=(*self.recordings, recording), pinned_fingerprint=pinned,
                       sequence=False)

    def as_sequence(self, recordings: tuple[Recording, ...]) -> Entry:
        return replace(self, recordings=recordings, pinned_fingerprint=None, sequence=True)

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
    """Parse a stored file; every problem names `source` and what to do about it."""
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
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CassetteError(
            f"Cassette file {source} uses format {version}, newer than this replay-proxy "
            f"understands (format {FORMAT_VERSION}). Upgrade replay-proxy "
            "(pip install -U replay-proxy) to read it.",
            code="cassette_format_unsupported",
        )
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_FORMATS:
        raise CassetteError(f"Cassette file {source} has no valid format version ({version!r}).")
    try:
        recordings = tuple(_decode_recording(item) for item in document["recordings"])
        return Entry(
            key=str(document["key"]),
            label=str(document.get("label", "")),
            request=dict(document["request"]),
            recordings=recordings,
            pinned_fingerprint=document.get("pinned_fingerprint"),
            extra=dict(document.get("extra") or {}),
            sequence=document.get("sequence") is True,
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise CassetteError(
            f"Cassette file {source} is missing or has a malformed field ({exc!r}). Restore it "
            "from version control or delete it to record again."
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


def _decode_recording(item: dict[str, Any]) -> Recording:
    events = None
    body = b""
    if "events" in item:
        events = tuple(_decode_event(event) for event in item["events"])
    else:
        body = decode_body(item)
    return Recording(
        status=int(item["status"]),
        headers={str(k): str(v) for k, v in item["headers"].items()},
        body=body,
        events=events,
        system_fingerprint=item.get("system_fingerprint"),
        model=item.get("model"),
        recorded_at=str(item.get("recorded_at", "")),
        usage=item.get("usage"),
        duration_ms=float(item.get("duration_ms", 0.0)),
        drift=Drift(item["drift"]) if item.get("drift") is not None else None,
        verified_at=item.get("verified_at"),
    )


# The shape of nearly every event the APIs send: an optional name line, one line of compact JSON.
_EVENT = re.compile(rb"(?:event: ([A-Za-z0-9_.\-]+)\n)?data: (\{.*\})\n\n", re.S)


def _event_text(name: str | None, data: Any) -> bytes:
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


def _decode_event(item: dict[str, Any]) -> SseEvent:
    if "data" in item:
        if not isinstance(item["data"], dict):
            raise ValueError("an event's data must be a JSON object")
        name = item.get("event")
        if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", name)):
            raise ValueError(f"invalid event name {name!r}")
        raw = _event_text(name, item["data"])
    elif "raw_base64" in item:
        raw = base64.b64decode(item["raw_base64"], validate=True)
    else:
        raw = str(item["raw"]).encode("utf-8")
    return SseEvent(at_ms=float(item["at_ms"]), raw=raw)


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


def decode_body(item: dict[str, Any]) -> bytes:
    encoding = item.get("body_encoding", "text")
    value = item.get("body", "")
    if encoding in _JSON_LAYOUTS:
        return orjson.dumps(value, option=_JSON_LAYOUTS[encoding]) + str(
            item.get("body_suffix", "")
        ).encode()
    if encoding == "text":
        return str(value).encode("utf-8")
    if encoding == "base64":
        return base64.b64decode(str(value), validate=True)
    raise ValueError(f"unknown body_encoding {encoding!r}")


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
