from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from replay_proxy.core.sse import EventSplitter, data_span, event_fields, is_done

EVENTS = [b"data: {\"a\": 1}\n\n", b"event: response.output_text.delta\ndata: {\"d\": \"x\"}\n\n",
          b": keep-alive comment\n\n", b"data: line one\ndata: line two\r\n\r\n", b"data: [DONE]\n\n"]


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_events_come_out_whole_whatever_the_chunking(cuts: list[int]) -> None:
    stream = b"".join(EVENTS)
    splitter = EventSplitter()
    found: list[bytes] = []
    position = 0
    for size in cuts * 20:
        if position >= len(stream):
            break
        found += splitter.feed(stream[position:position + size])
        position += size
    found += splitter.feed(stream[position:])
    assert found == EVENTS
    assert splitter.remainder() == b""


def test_fields_and_done() -> None:
    assert event_fields(EVENTS[1]) == (b"response.output_text.delta", b'{"d": "x"}')
    assert event_fields(EVENTS[3])[1] == b"line one\nline two"
    assert is_done(EVENTS[4]) and not is_done(EVENTS[0])


def test_unterminated_tail_is_kept() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2") == [b"data: 1\n\n"]
    assert splitter.remainder() == b"data: 2"


# Bytes that make up SSE framing, so that boundaries of every form (and near-misses such as
# "\r\n\r" at a chunk's end) turn up often.
_FRAMING = st.sampled_from([b"a", b"data: x", b":", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r",
                            b"\r\n\r\n", b"\r\n\r"])


def _split_whole(stream: bytes) -> tuple[list[bytes], bytes]:
    splitter = EventSplitter()
    events = splitter.feed(stream)
    return events, splitter.remainder()


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_FRAMING, max_size=60), data=st.data())
def test_any_chunking_gives_the_events_of_the_whole_stream(pieces: list[bytes],
                                                           data: st.DataObject) -> None:
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=len(stream) + 1)))
    splitter = EventSplitter()
    events: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += splitter.feed(stream[start:end])
    assert (events, splitter.remainder()) == _split_whole(stream)
    assert b"".join(events) + splitter.remainder() == stream


def test_a_crlf_boundary_split_across_chunks_is_found_once() -> None:
    for cut in range(1, 4):
        splitter = EventSplitter()
        event = b"data: big\r\n\r\n"
        found = splitter.feed(event[:-cut]) + splitter.feed(event[-cut:] + b"data: next")
        assert found == [event]
        assert splitter.remainder() == b"data: next"


def test_a_huge_event_in_small_chunks_comes_out_whole() -> None:
    event = b"data: " + b"x" * 300_000 + b"\n\n"
    splitter = EventSplitter()
    found = [e for start in range(0, len(event), 1024) for e in splitter.feed(event[start:start + 1024])]
    assert found == [event] and splitter.remainder() == b""


def test_data_span_points_at_the_single_data_line() -> None:
    raw = b"event: response.output_text.delta\r\ndata:{\"d\": 1}\r\n\r\n"
    start, end = data_span(raw) or (0, 0)
    assert raw[start:end] == b'{"d": 1}'
    assert data_span(EVENTS[0]) == (6, 14)
    assert data_span(EVENTS[3]) is None  # two data lines: their data is joined, not in one place
    assert data_span(EVENTS[2]) is None
