"""A cassette file is input from whoever edited it last: every rule it must keep to load.

Each case edits a valid file the way a hostile pull request could, and checks that loading it
is a CassetteError naming the file and the field, never anything else.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replay_proxy.core.canonical import IncomingRequest, KeyPolicy, canonical_request, request_key
from replay_proxy.core.cassette import (
    MAX_DEPTH,
    REPLAYED_HEADERS,
    Entry,
    Recording,
    SseEvent,
    decode_entry,
    encode_entry,
)
from replay_proxy.core.errors import CassetteError
from replay_proxy.core.explain import explain_miss
from replay_proxy.core.providers import parse_route
from replay_proxy.tools.report import ls_row, show_text

SOURCE = "cassettes/suite/chat.completions-abc.json"


def valid_entry() -> Entry:
    route = parse_route("/v1/chat/completions", {})
    assert route is not None
    body = orjson.dumps({"model": "gpt-4o-mini", "seed": 1,
                         "messages": [{"role": "user", "content": "Hi"}]})
    canonical = canonical_request(IncomingRequest(
        "POST", route, (("after", "x"),), {"content-type": "application/json",
                                          "openai-beta": "assistants=v2"}, body), KeyPolicy())
    whole = Recording(200, {"content-type": "application/json", "openai-poll-after-ms": "500",
                            "x-request-id": "req_1"},
                      body=b'{"id":"c","choices":[{"message":{"content":"Hello"}}]}',
                      system_fingerprint="fp_a", model="gpt", recorded_at="2026-01-01T00:00Z",
                      usage={"total_tokens": 3}, duration_ms=4.5)
    stream = Recording(200, {"content-type": "text/event-stream"}, events=(
        SseEvent(1.5, b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'),
        SseEvent(2.0, b"event: done\ndata: {}\n\n"),
        SseEvent(2.5, b"\xff raw bytes\n\n"),
        SseEvent(3.0, b"data: [DONE]\n\n")), system_fingerprint="fp_b")
    entry = Entry(request_key(canonical), route.label, canonical,
                  extra={"path": route.upstream_path})
    return entry.add(whole).add(stream)


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(encode_entry(valid_entry()))
    return loaded


def refused(edited: dict[str, Any] | bytes) -> str:
    raw = edited if isinstance(edited, bytes) else orjson.dumps(edited)
    with pytest.raises(CassetteError) as caught:
        decode_entry(raw, SOURCE)
    message = caught.value.message
    assert SOURCE in message
    return message


def test_the_valid_document_loads_and_writes_back_byte_for_byte() -> None:
    raw = encode_entry(valid_entry())
    assert decode_entry(raw, SOURCE) == valid_entry()
    assert encode_entry(decode_entry(raw, SOURCE)) == raw


def test_the_tour_cassettes_keep_every_rule() -> None:
    from pathlib import Path

    from tests.conftest import recorded_files

    files = recorded_files(Path(__file__).parent.parent / "cassettes")
    assert files
    for path in files:
        entry = decode_entry(path.read_bytes(), str(path))
        assert path.name == f"{entry.label}-{entry.key}.json"


# ---- names that become paths ---------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("key", "/../package"), ("key", "../../x"), ("key", "A" * 64), ("key", "a" * 63),
    ("key", "a" * 64 + "\n"), ("key", 7), ("key", None),
    ("label", "../../x"), ("label", ".."), ("label", ".hidden"), ("label", "a/b"),
    ("label", "a\\b"), ("label", ""), ("label", "x" * 61), ("label", ["chat"]),
])
def test_a_key_or_label_that_could_name_another_path_is_refused(field: str, value: Any) -> None:
    edited = document()
    edited[field] = value
    assert f"{field}:" in refused(edited)


@pytest.mark.parametrize("path", ["@evil.example/v1/chat/completions", ".evil.example/x",
                                  "//evil.example/v1/x", "/v1/../../x", "/admin", "v1/models",
                                  "/v1/chat completions", "/v1/a\\b", "/v1/a?b", 7])
def test_extra_path_must_be_an_api_path(path: Any) -> None:
    """`verify` appends it to the upstream's URL with the user's key: it must never name a host."""
    edited = document()
    edited["extra"] = {"path": path}
    assert "extra.path" in refused(edited)


# ---- what replay sends ---------------------------------------------------------------------

@pytest.mark.parametrize("header", ["content-length", "transfer-encoding", "connection",
                                    "set-cookie", "location", "Content-Type", "x-anything"])
def test_only_allowlisted_headers_load(header: str) -> None:
    edited = document()
    edited["recordings"][0]["headers"][header] = "0"
    assert "is not a header replay-proxy replays" in refused(edited)


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x=1", "a\nb", "\x00", 5, None, "x" * 5000])
def test_a_header_value_is_one_line_of_text(value: Any) -> None:
    edited = document()
    edited["recordings"][0]["headers"]["x-request-id"] = value
    assert "is not a header value" in refused(edited)


@pytest.mark.parametrize("value", ["-1", "1e3", "²", "9" * 5000, ""])
def test_poll_after_ms_is_a_whole_number(value: str) -> None:
    edited = document()
    edited["recordings"][0]["headers"]["openai-poll-after-ms"] = value
    refused(edited)


@pytest.mark.parametrize("status", [0, 101, 199, 600, 1000, -200, True, 200.0, "200", None])
def test_the_status_is_200_to_599(status: Any) -> None:
    edited = document()
    edited["recordings"][0]["status"] = status
    assert "status" in refused(edited)


@pytest.mark.parametrize("status", [204, 304])
def test_a_stream_has_a_status_with_a_body(status: int) -> None:
    """HTTP frames no body after 204 or 304: a stream's events would be written unframed."""
    edited = document()
    edited["recordings"][1]["status"] = status
    assert "has no body" in refused(edited)


# ---- pacing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("at_ms", ["inf", "1", -1, -0.001, 86_400_001, 1e300, 2**63, None,
                                   True, [1]])
def test_at_ms_is_a_number_from_zero_to_a_day(at_ms: Any) -> None:
    edited = document()
    edited["recordings"][1]["events"][0]["at_ms"] = at_ms
    assert "at_ms" in refused(edited)


def test_non_finite_numbers_never_parse() -> None:
    for spelled in (b"1e400", b"NaN", b"Infinity", b"-Infinity"):
        raw = encode_entry(valid_entry()).replace(b'"at_ms":1.5', b'"at_ms":' + spelled)
        refused(raw)


# ---- types, everywhere -----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "value"), [
    (("recordings",), ["abc"]), (("recordings",), "abc"), (("recordings",), None),
    (("recordings", 0), 1), (("recordings", 0, "headers"), []),
    (("recordings", 0, "body"), 5), (("recordings", 0, "body_encoding"), "pickle"),
    (("recordings", 0, "body_suffix"), "x"), (("recordings", 0, "usage"), "lots"),
    (("recordings", 0, "usage"), {"total_tokens": -5}),
    (("recordings", 0, "usage"), {"total_tokens": 2**60}),
    (("recordings", 0, "duration_ms"), "fast"), (("recordings", 0, "drift"), "drift:weather"),
    (("recordings", 0, "system_fingerprint"), ["fp"]), (("recordings", 0, "model"), 4),
    (("recordings", 0, "recorded_at"), None), (("recordings", 0, "verified_at"), 1),
    (("recordings", 1, "events"), {"0": {}}), (("recordings", 1, "events", 0), "data: x\n\n"),
    (("recordings", 1, "events", 0, "data"), [1]),
    (("recordings", 1, "events", 1, "event"), "a\nb"),
    (("recordings", 1, "events", 2), {"at_ms": 1, "raw_base64": "not base64!"}),
    (("recordings", 1, "events", 2), {"at_ms": 1, "raw_base64": "é"}),
    (("recordings", 1, "events", 2), {"at_ms": 1, "raw": 5}),
    (("recordings", 1, "events", 2), {"at_ms": 1}),
    (("request",), []), (("request", "query"), [["a"]]), (("request", "query"), {"a": "b"}),
    (("request", "query"), [["api-key", "sk-stored-by-an-old-version"]]),
    (("request", "headers"), {"host": "evil.example"}),
    (("request", "headers"), {"openai-beta": "a\r\nb"}),
    (("request", "method"), "post me"), (("request", "provider"), "evil"),
    (("request", "deployment"), "."), (("request", "route"), 5),
    (("extra",), "path"), (("sequence",), "yes"), (("pinned_fingerprint",), 5),
])
def test_every_field_is_type_checked(path: tuple[Any, ...], value: Any) -> None:
    edited = document()
    target = edited
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    refused(edited)


def test_a_credential_stored_in_the_query_is_named_not_quoted() -> None:
    edited = document()
    edited["request"]["query"] = [["api-key", "sk-stored-by-an-old-version"]]
    message = refused(edited)
    assert "'api-key'" in message and "sk-stored" not in message


def test_nesting_deeper_than_can_be_written_is_refused() -> None:
    """orjson reads 1024 levels but writes only MAX_DEPTH, and miss explanations walk requests
    recursively: a file nested deeper was not written by replay-proxy, and is refused."""
    edited = document()
    edited["request"]["body"]["messages"] = "DEEP"
    depth = MAX_DEPTH
    raw = orjson.dumps(edited).replace(b'"DEEP"', b"[" * depth + b"1" + b"]" * depth)
    assert "nested deeper" in refused(raw)


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b'"x"', b"1", b"{", b"\xff",
                                 b'{"format": true}', b'{"format": 2.0}', b'{"format": [2]}',
                                 b"[" * 2000 + b"]" * 2000])
def test_documents_that_are_no_cassette(raw: bytes) -> None:
    refused(raw)


# ---- no JSON input raises anything but a CassetteError ---------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
                                                                          allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["200", "inf", "-1", "a" * 64, "json", "base64",
                                              "text", "content-type", "set-cookie", "..", "."]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(
        ["format", "key", "label", "request", "recordings", "status", "headers", "events",
         "at_ms", "data", "raw", "raw_base64", "body", "body_encoding", "usage", "extra"]),
        children, max_size=5),
    max_leaves=25,
)


def _loads_or_refuses(raw: bytes) -> None:
    try:
        entry = decode_entry(raw, SOURCE)
    except CassetteError as exc:
        assert SOURCE in exc.message
        return
    # Whatever loads can be replayed, explained, listed and written back.
    for recording in entry.recordings:
        assert 200 <= recording.status <= 599
        assert set(recording.headers) <= REPLAYED_HEADERS
        for event in recording.events or ():
            assert 0 <= event.at_ms <= 86_400_000
    explain_miss("suite", entry.request, entry.key, [(entry.label, entry.key, entry.request)])
    ls_row(_item(entry), {})
    show_text("suite", entry)
    assert decode_entry(encode_entry(entry), SOURCE) == entry


def _item(entry: Entry) -> Any:
    from replay_proxy.store import StoredItem

    return StoredItem("suite", entry.label, entry.key, entry)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_document_loads_or_is_a_cassette_error(value: Any) -> None:
    _loads_or_refuses(orjson.dumps(value))


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(1, 2))
def test_any_document_with_a_format_loads_or_is_a_cassette_error(value: Any, version: int) -> None:
    if isinstance(value, dict):
        value = {**value, "format": version}
    _loads_or_refuses(orjson.dumps(value))


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path] if path else []
    if isinstance(value, dict):
        for name, child in value.items():
            found += _places(child, (*path, name))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _places(child, (*path, index))
    return found


BASE = document()
PLACES = _places(BASE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PLACES), st.booleans(), json_values), min_size=1,
                max_size=3))
def test_any_mutation_of_a_valid_cassette_loads_or_is_a_cassette_error(
        edits: list[tuple[tuple[Any, ...], bool, Any]]) -> None:
    edited = copy.deepcopy(BASE)
    for path, delete, value in edits:
        target: Any = edited
        try:
            for step in path[:-1]:
                target = target[step]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this place
        last = path[-1]
        if isinstance(target, dict) and isinstance(last, str):
            if delete:
                target.pop(last, None)
            else:
                target[last] = value
        elif isinstance(target, list) and isinstance(last, int) and last < len(target):
            target[last] = value
    _loads_or_refuses(orjson.dumps(edited))


@pytest.mark.parametrize(("levels", "loaded"), [(MAX_DEPTH, True), (MAX_DEPTH + 1, False)])
def test_nesting_is_refused_from_one_level_past_what_can_be_written(levels: int,
                                                                     loaded: bool) -> None:
    """The document is level 1, its request 2, the body 3: the innermost list of `messages`
    lands at exactly `levels`."""
    edited = document()
    edited["request"]["body"]["messages"] = "DEEP"
    inner = levels - 3
    raw = orjson.dumps(edited).replace(b'"DEEP"', b"[" * inner + b"1" + b"]" * inner)
    if loaded:
        assert decode_entry(raw, "deep.json").request["body"]["messages"]
    else:
        assert "nested deeper" in refused(raw)
