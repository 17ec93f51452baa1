"""Server-sent events framing: split a byte stream into whole events without re-chunking them.

Pure: the server feeds it bytes as they arrive from the upstream and gets back each complete
event exactly as it was sent, terminator included, so replay can give back the same bytes with
the same event boundaries.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LONGEST_BOUNDARY = 4
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    """Incremental: each byte is scanned for a boundary once, however the stream is chunked, so a
    huge event arriving in small chunks costs linear time, not a rescan per chunk."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # no boundary starts before this offset of the buffer

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += chunk
        events: list[bytes] = []
        start = 0
        position = self._scanned
        while (match := _BOUNDARY.search(buffer, position)) is not None:
            events.append(bytes(buffer[start:match.end()]))
            start = position = match.end()
        if start:
            del buffer[:start]
        # A boundary is at most 4 bytes (\r\n\r\n): its first 3 may already be here, so the
        # next scan starts 3 bytes back from the end.
        self._scanned = max(0, len(buffer) - _LONGEST_BOUNDARY + 1)
        return events

    def remainder(self) -> bytes:
        """Bytes after the last complete event (a stream that ended without a blank line)."""
        return bytes(self._buffer)


def event_fields(raw: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one raw event; data lines are joined with newlines."""
    name: bytes | None = None
    data: list[bytes] = []
    for line in _LINE.split(raw):
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, (b"\n".join(data) if data else None)


def data_span(raw: bytes) -> tuple[int, int] | None:
    """Where the data of an event with a single data line sits in its raw bytes: (start, end).

    None when the event has no data line, or several (their data is joined, so it does not sit
    in one place)."""
    span: tuple[int, int] | None = None
    start = 0
    for line_end in (*_LINE.finditer(raw), None):
        end = line_end.start() if line_end is not None else len(raw)
        if raw.startswith(b"data:", start, end):
            if span is not None:
                return None
            value = start + 5
            if raw.startswith(b" ", value, end):
                value += 1
            span = (value, end)
        if line_end is None:
            break
        start = line_end.end()
    return span


def event_data(raw: bytes) -> bytes | None:
    return event_fields(raw)[1]


def is_done(raw: bytes) -> bool:
    return event_data(raw) == b"[DONE]"
