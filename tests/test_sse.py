from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from replay_proxy.core.sse import EventSplitter, event_fields, is_done

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
