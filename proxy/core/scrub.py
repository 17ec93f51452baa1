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

Where they are looked for:

- In JSON, credentials are looked for in the decoded strings, so one written with escapes
  (`\\u0073k-...`) is found. Only the bytes that spell the credential inside its string are
  replaced: the rest of the document, its layout and its other escapes stay as they were, and
  nothing outside strings (numbers, structure) is ever touched.
- A stream is read as the text its events add up to. The strings at the same place in
  successive events (the same event name and JSON path, the same choice `index`, output item
  or content part) are one text, so a key sent four characters per delta is found. A
  credential's part in the first event it touches becomes `[REDACTED]`; its parts in later
  events are removed (a delta of `"roj-"` becomes `""`), so the stream still adds up to the
  scrubbed text. Events that hold no part of a credential keep every byte, and so do the
  bytes of the others outside the credential. Data that is not JSON is scrubbed event by
  event.
- Anything else (text, bytes that are not UTF-8) as it is; bytes round-trip exactly.

Each match becomes `[REDACTED]`; overlapping or touching matches become one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .sse import data_span, event_fields

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
_SHORTEST_SHAPE = len("org-") + 16
_UPPER = re.compile(r"[A-Z]")
_LOWER = re.compile(r"[a-z]")
_DIGIT = re.compile(r"[0-9]")
# In a valid JSON document every quote outside a string opens one.
_JSON_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
_JSON_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
# Fields of a stream event that tell apart texts streamed side by side (Responses API).
_STREAM_PLACES = ("item_id", "output_index", "content_index", "summary_index")

CREDENTIAL_HEADERS = ("authorization", "api-key", "openai-organization", "openai-project",
                      "cookie", "x-replay-auth")
_MIN_SECRET = 6  # shorter values would redact ordinary words, and are no secret anyway


def secret_values(headers: Mapping[str, str], settings: Settings | None = None,
                  also: Iterable[str] = ()) -> list[bytes]:
    """The literal credential values of an exchange, so they can be searched for in bodies: what
    the client sent (its credential headers, and `also`: its credential query parameters), and
    the keys the proxy itself holds (an upstream may echo the key it was sent, which is the
    proxy's own when it has one)."""
    candidates: list[str] = list(also)
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


def scrub(data: bytes, secrets: Iterable[bytes] = (),
          patterns: Sequence[re.Pattern[str]] = ()) -> bytes:
    """`data` with every credential replaced by `[REDACTED]`; bytes that hold none are kept.
    `patterns` are the user's own redactions (`--redact`), removed the same way."""
    wanted = _as_text(secrets)
    strings = _json_strings(data, with_places=False)
    pieces = [_text_piece(0, 0, data)] if strings is None else [piece for piece, _ in strings]
    return _apply([data], _edits([[piece] for piece in pieces], wanted, patterns))[0]


def scrub_stream(events: Sequence[bytes], secrets: Iterable[bytes] = (),
                 patterns: Sequence[re.Pattern[str]] = ()) -> list[bytes]:
    """The raw events of one stream, scrubbed as the text they add up to (see the module's
    docstring for the rule); an event that holds no part of a credential is returned as is."""
    wanted = _as_text(secrets)
    shortest = 1 if patterns else _shortest(wanted)
    channels: dict[Hashable, list[_Piece]] = {}
    alone: list[list[_Piece]] = []
    for number, raw in enumerate(events):
        span = data_span(raw)
        strings = None
        if span is not None:
            start, end = span
            strings = _json_strings(raw[start:end], number, start, shortest=shortest)
        if span is None or strings is None:
            alone.append([_text_piece(number, 0, raw)])
            continue
        alone += [[_text_piece(number, 0, raw[:start])], [_text_piece(number, end, raw[end:])]]
        name = event_fields(raw)[0]
        for piece, place in strings:
            if place is None:
                alone.append([piece])
            else:
                channels.setdefault((name, place), []).append(piece)
    return _apply(list(events), _edits([*channels.values(), *alone], wanted, patterns))


def scrub_text(text: str, secrets: Iterable[bytes] = ()) -> str:
    return scrub(text.encode(), secrets).decode("utf-8", "replace")


def credential_spans(text: str, secrets: Iterable[str] = (),
                     patterns: Sequence[re.Pattern[str]] = ()) -> list[tuple[int, int]]:
    """Where credentials (and the user's redactions) sit in `text`: sorted, non-overlapping
    (start, end) ranges."""
    spans: list[tuple[int, int]] = []
    for secret in secrets:
        if len(secret) < _MIN_SECRET:
            continue
        start = text.find(secret)
        while start >= 0:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    spans += [match.span() for match in _SHAPES.finditer(text) if _looks_random(match)]
    for pattern in patterns:
        spans += [match.span() for match in pattern.finditer(text) if match.end() > match.start()]
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


class _Piece(NamedTuple):  # a tuple: a stream makes one per string, and it is cheap to build
    """A run of text in one event (or body): plain bytes, or the inside of a JSON string."""

    event: int
    start: int  # where its bytes begin in the event
    raw: bytes
    text: str
    escaped: bool  # JSON string content holding escapes: characters and bytes do not align

    def offset(self, index: int) -> int:
        """Where character `index` of the text begins in the event's bytes."""
        if not self.escaped:
            return self.start + len(self.text[:index].encode("utf-8", "surrogateescape"))
        position = characters = 0
        escapes = _JSON_ESCAPE.finditer(self.raw)
        for escape in escapes:
            run = self.raw[position:escape.start()].decode()
            if characters + len(run) > index:
                break
            characters += len(run)
            position = escape.end()
            code = escape.group(1)
            if code is not None and 0xD800 <= int(code, 16) < 0xDC00:  # a pair: one character
                position = next(escapes).end()
            if characters == index:
                return self.start + escape.start()
            characters += 1
        run = self.raw[position:].decode()
        return self.start + position + len(run[:index - characters].encode())


def _text_piece(event: int, start: int, raw: bytes) -> _Piece:
    return _Piece(event, start, raw, raw.decode("utf-8", "surrogateescape"), escaped=False)


def _json_strings(data: bytes, event: int = 0, start: int = 0, with_places: bool = True,
                  shortest: int = 0) -> list[tuple[_Piece, Hashable | None]] | None:
    """The strings of a JSON document, with their place in a stream (the event's distinguishing
    fields and the JSON path; None for object keys, which never continue in a later event).
    Keys shorter than `shortest` (too short to hold a credential) are left out. None when
    `data` is not a JSON object, array or string."""
    if data.lstrip()[:1] not in (b"{", b"[", b'"'):
        return None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    literals = list(_JSON_STRING.finditer(data))
    places: list[Hashable | None] = []
    if with_places:
        with contextlib.suppress(RecursionError):  # nested deeper than a path is worth following
            places = list(_places(document, _stream_place(document), ()))
    if len(places) != len(literals):  # or duplicate object keys: no path for each string
        places = [None] * len(literals)
        shortest = 0
    found = []
    for literal, place in zip(literals, places, strict=True):
        raw = literal.group(1)
        if place is None and len(raw) < shortest:
            continue
        escaped = b"\\" in raw
        text = orjson.loads(literal.group(0)) if escaped else raw.decode()
        found.append((_Piece(event, start + literal.start(1), raw, text, escaped), place))
    return found


def _stream_place(document: Any) -> tuple[Any, ...]:
    if not isinstance(document, dict):
        return ()
    return tuple((name, document[name]) for name in _STREAM_PLACES
                 if isinstance(document.get(name), (str, int)))


def _places(value: Any, stream_place: tuple[Any, ...],
            path: tuple[Any, ...]) -> Iterator[Hashable | None]:
    """In document order, what `_json_strings` pairs with each string literal."""
    if isinstance(value, str):
        yield (stream_place, path)
    elif isinstance(value, dict):
        for name, item in value.items():
            yield None
            yield from _places(item, stream_place, (*path, name))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            # Chat streams carry one choice per event, at position 0 whatever its index.
            index = item.get("index") if isinstance(item, dict) else None
            step = ("index", index) if isinstance(index, int) else position
            yield from _places(item, stream_place, (*path, step))


def _edits(texts: Iterable[list[_Piece]], secrets: list[str],
           patterns: Sequence[re.Pattern[str]] = ()) -> dict[int, list[tuple[int, int, bytes]]]:
    """Per event, the byte ranges to replace and what with, for the credentials in each text
    (a list of pieces read as one)."""
    edits: dict[int, list[tuple[int, int, bytes]]] = {}
    shortest = 1 if patterns else _shortest(secrets)
    for pieces in texts:
        whole = "".join(piece.text for piece in pieces)
        if len(whole) < shortest:
            continue
        for start, end in credential_spans(whole, secrets, patterns):
            replacement = REDACTED.encode()
            begins = 0
            for piece in pieces:
                ends = begins + len(piece.text)
                if begins < end and start < ends:
                    low, high = max(start, begins) - begins, min(end, ends) - begins
                    edits.setdefault(piece.event, []).append(
                        (piece.offset(low), piece.offset(high), replacement))
                    replacement = b""
                begins = ends
    return edits


def _shortest(secrets: list[str]) -> int:
    """The length of the shortest credential there is to find: most strings of an answer ("id",
    "object", a one-word delta) are shorter, and need no search."""
    return min([_SHORTEST_SHAPE, *(len(secret) for secret in secrets
                                   if len(secret) >= _MIN_SECRET)])


def _apply(events: list[bytes], edits: dict[int, list[tuple[int, int, bytes]]]) -> list[bytes]:
    for number, changes in edits.items():
        raw = events[number]
        pieces: list[bytes] = []
        kept = 0
        for start, end, replacement in sorted(changes):
            pieces += [raw[kept:start], replacement]
            kept = end
        pieces.append(raw[kept:])
        events[number] = b"".join(pieces)
    return events


def _as_text(secrets: Iterable[bytes]) -> list[str]:
    return [secret.decode("utf-8", "surrogateescape") for secret in secrets]
