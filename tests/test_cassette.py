from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from replay_proxy.core.cassette import (
    FORMAT_VERSION,
    Entry,
    Recording,
    SseEvent,
    decode_body,
    decode_entry,
    encode_body,
    encode_entry,
)
from replay_proxy.core.errors import CassetteError


@pytest.mark.parametrize("body", [
    b'{"b": 1, "a": [1.5, "\xc3\xa9"]}',  # compact, original key order, raw UTF-8
    orjson.dumps({"z": 1, "a": {"y": 2}}, option=orjson.OPT_INDENT_2) + b"\n",
    b'{"a":1}',
    b'{"a": 1.0}',  # a float spelling orjson would not reproduce: kept as text
    b'{"a": "\\u00e9"}',  # escaped unicode: kept as text
    b"plain text",
    b"\x00\xff binary \x89PNG",
    b"",
])
def test_bodies_round_trip_byte_for_byte(body: bytes) -> None:
    stored = orjson.loads(orjson.dumps(encode_body(body)))
    assert decode_body(stored) == body


@given(st.binary(max_size=200))
def test_any_bytes_round_trip(body: bytes) -> None:
    assert decode_body(orjson.loads(orjson.dumps(encode_body(body)))) == body


def test_json_bodies_are_stored_readably() -> None:
    assert encode_body(b'{"id":"x","object":"chat.completion"}')["body"] == \
        {"id": "x", "object": "chat.completion"}


def _entry() -> Entry:
    recording = Recording(status=200, headers={"content-type": "application/json"},
                          body=b'{"id":"b","answer":"yes"}', system_fingerprint="fp_1",
                          model="gpt", recorded_at="2026-01-01T00:00:00.000Z")
    stream = Recording(status=200, headers={"content-type": "text/event-stream"},
                       events=(SseEvent(1.5, b"data: {\"x\":1}\n\n"),
                               SseEvent(2.0, b"data: [DONE]\n\n")))
    return Entry("f" * 64, "chat.completions", {"route": "chat/completions", "body": {"b": 1,
                                                                                     "a": 2}}) \
        .add(recording).add(stream)


def test_entry_round_trips_and_file_is_pretty_and_sorted() -> None:
    entry = _entry()
    raw = encode_entry(entry)
    assert decode_entry(raw, "x.json") == entry
    text = raw.decode()
    assert text.startswith('{\n  "format": 2,\n  "key"')
    # What was asked comes before what was answered; the canonical request is sorted.
    assert text.index('"request"') < text.index('"recordings"')
    assert text.index('"a": 2') < text.index('"b": 1')
    assert entry.pinned_fingerprint == "fp_1"
    assert decode_entry(raw, "x").recordings[0].body == b'{"id":"b","answer":"yes"}'


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"{ truncated", "not valid JSON"),
    (b"[]", "does not hold a JSON object"),
    (b'{"format": 1, "key": "k"}', "key: 'k' is not a key"),
    (b'{"format": "one"}', "no valid format version"),
])
def test_corrupt_files_name_themselves(raw: bytes, fragment: str) -> None:
    with pytest.raises(CassetteError) as caught:
        decode_entry(raw, "cassettes/default/chat-abc.json")
    assert "cassettes/default/chat-abc.json" in caught.value.message
    assert fragment in caught.value.message


def test_newer_format_asks_for_an_upgrade() -> None:
    raw = orjson.dumps({"format": FORMAT_VERSION + 1, "key": "k"})
    with pytest.raises(CassetteError) as caught:
        decode_entry(raw, "f.json")
    assert "Upgrade replay-proxy" in caught.value.message
    assert caught.value.code == "cassette_format_unsupported"


def test_format_1_files_still_load_as_alternatives() -> None:
    document = orjson.loads(encode_entry(_entry()))
    document["format"] = 1
    del document["sequence"]
    entry = decode_entry(orjson.dumps(document), "old.json")
    assert entry.sequence is False and len(entry.recordings) == 2


def test_a_sequence_round_trips_without_a_pinned_fingerprint() -> None:
    entry = _entry()
    sequence = entry.as_sequence(entry.recordings)
    decoded = decode_entry(encode_entry(sequence), "seq.json")
    assert decoded.sequence is True and decoded.pinned_fingerprint is None
    assert decoded.recordings == entry.recordings


def test_an_unknown_drift_class_names_the_file() -> None:
    document = orjson.loads(encode_entry(_entry()))
    document["recordings"][0]["drift"] = "drift:weather"
    with pytest.raises(CassetteError) as caught:
        decode_entry(orjson.dumps(document), "cassettes/x/chat-k.json")
    assert "cassettes/x/chat-k.json" in caught.value.message


_EVENT_PIECES = st.sampled_from([
    b"data: ", b"event: response.output_text.delta\n", b"{", b"}", b'"a":1', b'"b":"x\\ny"',
    b'"c":1.10', b',', b"\n", b"\n\n", b"\r\n", b"[DONE]", b" ", b"\xff", b'"\\u00e9"', b":",
])


@given(st.lists(_EVENT_PIECES, max_size=12).map(b"".join), st.floats(0, 1e6))
def test_any_event_comes_back_byte_for_byte(raw: bytes, at_ms: float) -> None:
    entry = Entry("f" * 64, "x", {}).add(Recording(200, {}, events=(SseEvent(at_ms, raw),)))
    decoded = decode_entry(encode_entry(entry), "e.json")
    assert decoded.recordings[0].events == (SseEvent(round(at_ms, 3), raw),)


def test_json_events_are_stored_as_objects_and_the_rest_as_text() -> None:
    events = (SseEvent(1.0, b'data: {"id":"c1","choices":[{"delta":{"content":"Hi"}}]}\n\n'),
              SseEvent(2.0, b'event: response.completed\ndata: {"type":"response.completed"}\n\n'),
              SseEvent(3.0, b'data: {"logprob":-0.1000}\n\n'),  # 0.1000 would not come back
              SseEvent(4.0, b"data: [DONE]\n\n"))
    entry = Entry("f" * 64, "x", {}).add(Recording(200, {}, events=events))
    stored = orjson.loads(encode_entry(entry))["recordings"][0]["events"]
    assert stored[0] == {"at_ms": 1.0, "data": {"id": "c1",
                                               "choices": [{"delta": {"content": "Hi"}}]}}
    assert stored[1] == {"at_ms": 2.0, "event": "response.completed",
                         "data": {"type": "response.completed"}}
    assert stored[2] == {"at_ms": 3.0, "raw": 'data: {"logprob":-0.1000}\n\n'}
    assert stored[3] == {"at_ms": 4.0, "raw": "data: [DONE]\n\n"}
    assert decode_entry(encode_entry(entry), "e.json").recordings[0].events == events


def test_an_events_key_order_is_kept() -> None:
    raw = b'data: {"z":1,"a":{"y":2,"b":3}}\n\n'
    entry = Entry("f" * 64, "x", {}).add(Recording(200, {}, events=(SseEvent(0, raw),)))
    text = encode_entry(entry).decode()
    assert text.index('"z"') < text.index('"a"') and text.index('"y"') < text.index('"b"')


@pytest.mark.parametrize("bad", [{"at_ms": 1, "data": [1]}, {"at_ms": 1, "data": {},
                                                            "event": "a\nb"}])
def test_a_malformed_event_names_the_file(bad: dict[str, object]) -> None:
    document = orjson.loads(encode_entry(_entry()))
    document["recordings"][1]["events"][0] = bad
    with pytest.raises(CassetteError) as caught:
        decode_entry(orjson.dumps(document), "cassettes/s/chat-k.json")
    assert "cassettes/s/chat-k.json" in caught.value.message
