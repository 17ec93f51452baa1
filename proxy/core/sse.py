"""Server-sent events framing: split a byte stream into whole events without re-chunking them.

Pure: the server feeds it bytes as they arrive from the upstream and gets back each complete
event exactly as it was sent, terminator included, so replay can give back the same bytes with
the same event boundaries.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            if match.start() < start:
                continue
            events.append(self._buffer[start:match.end()])
            start = match.end()
        self._buffer = self._buffer[start:]
        return events

    def remainder(self) -> bytes:
        """Bytes after the last complete event (a stream that ended without a blank line)."""
        return self._buffer


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


def event_data(raw: bytes) -> bytes | None:
    return event_fields(raw)[1]


def is_done(raw: bytes) -> bool:
    return event_data(raw) == b"[DONE]"
