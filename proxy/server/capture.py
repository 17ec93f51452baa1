"""An upstream answer as it arrives: a body read whole (within a size limit), or a stream split
into its events, each with its time offset from when the request was sent.

The proxy's recorder, `verify` and `probe` all capture answers with this code, so what one of
them stores or compares is what the others would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from ..core.cassette import SseEvent
from ..core.sse import EventSplitter, is_done


def is_event_stream(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").startswith("text/event-stream")


class AnswerTooLarge(Exception):
    """A body grew past its limit; `parts` holds every byte read so far, in order."""

    def __init__(self, parts: list[bytes], size: int) -> None:
        super().__init__(f"the answer is over {size} bytes")
        self.parts = parts
        self.size = size


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or AnswerTooLarge once more than `limit` bytes have arrived."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        parts.append(chunk)
        if size > limit:
            raise AnswerTooLarge(parts, size)
    return b"".join(parts)


class StreamCapture:
    """The events of a stream as its chunks are fed in: whole events only, each stamped with
    the time its last byte arrived, counted from `started` (the event loop's clock when the
    request was sent)."""

    def __init__(self, started: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = started
        self._splitter = EventSplitter()
        self.events: list[SseEvent] = []
        self.done = False  # the stream sent its `data: [DONE]`

    def elapsed_ms(self) -> float:
        return (self._loop.time() - self._started) * 1000

    def feed(self, chunk: bytes) -> None:
        at_ms = self.elapsed_ms()
        for raw in self._splitter.feed(chunk):
            self.events.append(SseEvent(at_ms, raw))
            self.done = self.done or is_done(raw)

    def finish(self) -> list[SseEvent]:
        """Every event, with the bytes after the last blank line (a stream that ended without
        one) as a last event."""
        remainder = self._splitter.remainder()
        if remainder:
            self.events.append(SseEvent(self.elapsed_ms(), remainder))
        return self.events


def stream_complete(capture: StreamCapture, response: aiohttp.ClientResponse) -> bool:
    """Whether a stream read to its end finished cleanly: `[DONE]`, or the end of the body for
    servers that send none (a connection cut short is neither)."""
    return capture.done or response.content.is_eof()


@dataclass(frozen=True)
class Answer:
    """An answer read whole: `body`, or `events` for a stream (`complete` False when it was cut
    short)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    events: list[SseEvent] | None
    duration_ms: float
    complete: bool = True


async def read_answer(response: aiohttp.ClientResponse, started: float, limit: int) -> Answer:
    """Read an answer to its end. Raises AnswerTooLarge past `limit` bytes; a body whose
    connection fails raises aiohttp's error (or TimeoutError), a stream whose connection fails
    is returned with what arrived, not `complete`."""
    loop = asyncio.get_running_loop()
    if not is_event_stream(response.headers):
        body = await read_body(response, limit)
        return Answer(response.status, response.headers, body, None,
                      (loop.time() - started) * 1000)
    capture = StreamCapture(started)
    size = 0
    try:
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise AnswerTooLarge([], size)
            capture.feed(chunk)
        complete = stream_complete(capture, response)
    except (aiohttp.ClientError, TimeoutError):
        complete = False
    events = capture.finish()
    return Answer(response.status, response.headers, b"", events, capture.elapsed_ms(),
                  complete)
