"""Forward a request upstream, tee the answer to the waiting clients, and store it once whole.

Nothing is stored until the upstream exchange has completed cleanly: a full body, or a stream
that reached `[DONE]` or a clean end. Stored copies are scrubbed of credentials first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson

from ..core import fingerprints
from ..core.cassette import (
    REPLAYED_HEADERS,
    Entry,
    Recording,
    SseEvent,
    describe_events,
    describe_payload,
    now_iso,
)
from ..core.errors import UpstreamError
from ..core.modes import Action, Mode
from ..core.providers import Route
from ..core.scrub import scrub, scrub_text
from ..core.sse import EventSplitter, is_done
from .flights import Flight, FlightCut, Head
from .state import ProxyState

TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})
_LIVE_DROPPED = frozenset({
    "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive",
    "server", "date",
})


@dataclass(frozen=True)
class Exchange:
    """A request ready to be forwarded, and where its answer would be stored."""

    cassette: str
    key: str
    route: Route
    method: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    canonical: dict[str, Any]
    action: Action
    mode: Mode
    fingerprint: str  # replay policy, for a recording another process made meanwhile
    secrets: tuple[bytes, ...]


def storable(status: int, record_errors: bool) -> bool:
    if 200 <= status < 300:
        return True
    transient = status >= 500 or status in TRANSIENT_STATUSES
    return record_errors and not transient


def live_headers(upstream_headers: Any) -> dict[str, str]:
    return {
        name: value for name, value in upstream_headers.items()
        if name.lower() not in _LIVE_DROPPED
    }


def stored_headers(upstream_headers: Any) -> dict[str, str]:
    return {
        name.lower(): value for name, value in upstream_headers.items()
        if name.lower() in REPLAYED_HEADERS
    }


async def pump(state: ProxyState, exchange: Exchange, flight: Flight) -> None:
    """Fill the flight: from the upstream, or, when another process sharing the store recorded
    the key while this one waited for it, from that recording."""
    if exchange.action is not Action.RECORD:  # passthrough: nothing to store
        await _forward(state, exchange, flight, None)
        return
    async with state.store.lock(exchange.cassette, exchange.key):
        stored = await state.store.get(exchange.cassette, exchange.key, exchange.route.label)
        selection = None
        if stored is not None and exchange.mode is not Mode.REFRESH:  # refresh always forwards
            selection = fingerprints.select(stored, exchange.fingerprint)
        if stored is None or selection is None or selection.recording is None:
            await _forward(state, exchange, flight, stored)
            return
    state.remember(exchange.cassette, stored)
    state.count(exchange.cassette, "hits")
    recording = selection.recording
    for chunk in [event.raw for event in recording.events or ()] or [recording.body]:
        flight.push(chunk)
    headers = {**recording.headers, "X-Replay-Fingerprint": selection.fingerprint or ""}
    flight.start(Head(recording.status, headers, recording.is_stream, "hit"))
    flight.finish()


async def _forward(state: ProxyState, exchange: Exchange, flight: Flight,
                   existing: Entry | None) -> None:
    """Forward upstream and tee the answer; clients get it before it is written to the store."""
    assert state.upstream is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await state.upstream.send(
        exchange.method, exchange.route, exchange.query, exchange.headers, exchange.body
    )
    state.count(exchange.cassette, "upstream_calls")
    async with response:
        keep = exchange.action is Action.RECORD and storable(
            response.status, state.settings.record_errors
        )
        replay_status = "recorded" if keep else "passthrough"
        content_type = response.headers.get("content-type", "")
        headers = live_headers(response.headers)
        if not content_type.startswith("text/event-stream"):
            try:
                body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamError(
                    f"The upstream broke off its answer for {exchange.route.route} mid-body "
                    f"({exc.__class__.__name__}); nothing was stored.",
                    code="upstream_cut",
                ) from exc
            duration_ms = (loop.time() - started) * 1000
            recording = None
            if keep and exchange.mode is Mode.REFRESH:  # its drift class goes out as a header
                recording = classified(exchange, existing, body_recording(
                    response.status, response.headers, body, exchange.secrets, duration_ms))
            flight.push(body)
            flight.start(Head(response.status, headers, False, replay_status,
                              recording.drift if recording else None))
            flight.finish()
            if keep:
                await asyncio.sleep(0)  # the waiting clients send their answers first
                if recording is None:
                    recording = body_recording(response.status, response.headers, body,
                                               exchange.secrets, duration_ms)
                await commit(state, exchange, existing, recording)
            return

        flight.start(Head(response.status, headers, True, replay_status))
        splitter = EventSplitter()
        events: list[SseEvent] = []
        saw_done = False
        try:
            async for chunk in response.content.iter_any():
                flight.push(chunk)
                at_ms = (loop.time() - started) * 1000
                for raw in splitter.feed(chunk):
                    events.append(SseEvent(at_ms, raw))
                    saw_done = saw_done or is_done(raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FlightCut(f"upstream stream cut: {exc.__class__.__name__}") from exc
        if not saw_done and not response.content.is_eof():
            raise FlightCut("upstream stream ended early")
        remainder = splitter.remainder()
        if remainder:
            events.append(SseEvent((loop.time() - started) * 1000, remainder))
        flight.finish()
        if keep:
            await asyncio.sleep(0)  # the waiting clients end their answers first
            await commit(state, exchange, existing, classified(exchange, existing, stream_recording(
                response.status, response.headers, events, exchange.secrets,
                (loop.time() - started) * 1000)))


def body_recording(status: int, headers: Any, body: bytes, secrets: tuple[bytes, ...],
                   duration_ms: float) -> Recording:
    """A whole-body answer as stored: scrubbed, with its fingerprint, model and usage."""
    scrubbed = scrub(body, secrets)
    fingerprint, model, usage = describe_payload(scrubbed)
    return Recording(status=status, headers=stored_headers(headers), body=scrubbed,
                     system_fingerprint=fingerprint, model=model, usage=usage,
                     recorded_at=now_iso(), duration_ms=duration_ms)


def stream_recording(status: int, headers: Any, events: list[SseEvent],
                     secrets: tuple[bytes, ...], duration_ms: float) -> Recording:
    scrubbed = tuple(replace(event, raw=scrub(event.raw, secrets)) for event in events)
    fingerprint, model, usage = describe_events(scrubbed)
    return Recording(status=status, headers=stored_headers(headers), events=scrubbed,
                     system_fingerprint=fingerprint, model=model, usage=usage,
                     recorded_at=now_iso(), duration_ms=duration_ms)


def classified(exchange: Exchange, existing: Entry | None, recording: Recording) -> Recording:
    """In refresh mode, the recording marked same or drift against the key's pinned one."""
    if exchange.mode is not Mode.REFRESH or existing is None:
        return recording
    pinned = fingerprints.select(existing, fingerprints.PINNED).recording
    return replace(recording, drift=fingerprints.classify(pinned, recording))


async def commit(state: ProxyState, exchange: Exchange, existing: Entry | None,
                 recording: Recording) -> None:
    """Add the recording to its key (a new entry for a new key) and write it."""
    if existing is None:
        request = _scrubbed_request(exchange)
        entry = Entry(exchange.key, exchange.route.label, request,
                      extra={"path": exchange.route.upstream_path}).add(recording)
    else:
        entry = existing.add(recording)
    await state.store.put(exchange.cassette, entry)
    state.remember(exchange.cassette, entry)
    state.used(exchange.cassette, exchange.key)
    state.count(exchange.cassette, "recorded")
    if recording.drift is not None:
        state.count(exchange.cassette, recording.drift)


def _scrubbed_request(exchange: Exchange) -> dict[str, Any]:
    text = orjson.dumps(exchange.canonical).decode()
    cleaned = scrub_text(text, exchange.secrets)
    if cleaned == text:
        return exchange.canonical
    loaded: dict[str, Any] = orjson.loads(cleaned)
    return loaded
