"""Forward a request upstream, tee the answer to the waiting clients, and store it once whole.

Nothing is stored until the upstream exchange has completed cleanly: a full body, or a stream
that reached `[DONE]` or a clean end. Stored copies are scrubbed of credentials first.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import aiohttp
import orjson

from ..core import fingerprints
from ..core.canonical import CanonicalRequest
from ..core.cassette import (
    REPLAYED_HEADERS,
    RULES_CHANGED,
    Entry,
    Recording,
    SseEvent,
    describe_events,
    describe_payload,
    now_iso,
)
from ..core.errors import UpstreamError
from ..core.fingerprints import FingerprintChoice
from ..core.modes import Mode
from ..core.plan import Forward, Replay, ReplayStatus, plan, stored_entry
from ..core.providers import Route
from ..core.scrub import scrub, scrub_stream, scrub_text
from ..core.settings import Settings
from .capture import (
    AnswerTooLarge,
    StreamCapture,
    is_event_stream,
    read_body,
    stream_complete,
)
from .flights import Flight, FlightCut, Head
from .sessions import DRIFT_COUNTERS
from .state import ProxyState

log = logging.getLogger("replay_proxy")

TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})
_LIVE_DROPPED = frozenset({
    "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive",
    "server", "date",
})


@dataclass(frozen=True)
class Exchange:
    """A request ready to be forwarded, and how its answer is stored (`forward`, or None to
    store nothing). The mode, fingerprint policy and occurrence are the plan's inputs, asked
    again under the key's lock."""

    cassette: str
    key: str
    route: Route
    method: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    canonical: CanonicalRequest
    forward: Forward | None
    mode: Mode
    fingerprint: FingerprintChoice
    occurrence: int | None
    secrets: tuple[bytes, ...]
    stale_before: str | None = None  # --max-age, as the plan takes it
    # The matching rules changed the request as stored (a mask, a redaction, an ignored path):
    # it is not the one that was sent, so verify must not re-send it.
    rules_changed: bool = False


def storable(status: int, record_errors: bool) -> bool:
    if 200 <= status < 300:
        return True
    transient = status >= 500 or status in TRANSIENT_STATUSES
    return record_errors and not transient


def live_headers(upstream_headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value for name, value in upstream_headers.items()
        if name.lower() not in _LIVE_DROPPED
    }


def stored_headers(upstream_headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name.lower(): value for name, value in upstream_headers.items()
        if name.lower() in REPLAYED_HEADERS
    }


def replay_headers(settings: Settings, replay: Replay) -> dict[str, str]:
    """The stored headers of a replayed answer, with where it stands: X-Replay-Fingerprint
    for a generation key, X-Replay-Sequence for a sequenced one."""
    # Loading already refused any other header; this keeps the rule where the bytes go out.
    headers = {name: value for name, value in replay.recording.headers.items()
               if name in REPLAYED_HEADERS}
    if replay.position is None:
        headers["X-Replay-Fingerprint"] = replay.fingerprint or ""
        return headers
    headers["X-Replay-Sequence"] = replay.position.header()
    speed = settings.replay_timing.speed
    if speed == 0:
        # The SDK's polling helpers wait as long as this says (a second when it is absent):
        # a replay has nothing to wait for.
        headers["openai-poll-after-ms"] = "0"
    elif "openai-poll-after-ms" in headers:
        recorded = headers["openai-poll-after-ms"]
        if recorded.isdigit():
            headers["openai-poll-after-ms"] = str(int(int(recorded) / speed))
    return headers


async def pump(state: ProxyState, exchange: Exchange, flight: Flight) -> None:
    """Fill the flight: from the upstream, or, when another process sharing the store recorded
    the answer while this one waited for the key's lock, from that recording."""
    if exchange.forward is None:  # passthrough: nothing to store
        await _forward(state, exchange, flight, None, None)
        return
    async with state.store.lock(exchange.cassette, exchange.key):
        stored = await state.store.get(exchange.cassette, exchange.key, exchange.route.label)
        if stored is not None:
            # Its recordings answer this request, or it refreshes them: in use either way.
            state.used(exchange.cassette, exchange.key)
        decision = plan(exchange.mode, stored, fingerprint=exchange.fingerprint,
                        occurrence=exchange.occurrence, method=exchange.method,
                        stale_before=exchange.stale_before)
        if not isinstance(decision, Replay):
            forward = decision if isinstance(decision, Forward) else exchange.forward
            await _forward(state, exchange, flight, stored, forward)
            return
    assert stored is not None
    state.remember(exchange.cassette, stored)
    state.count(exchange.cassette, "hits")
    recording = decision.recording
    for chunk in [event.raw for event in recording.events or ()] or [recording.body]:
        flight.push(chunk)
    flight.start(Head(recording.status, replay_headers(state.settings, decision),
                      recording.is_stream, ReplayStatus.HIT))
    flight.finish()


async def _forward(state: ProxyState, exchange: Exchange, flight: Flight,
                   existing: Entry | None, forward: Forward | None) -> None:
    """Forward upstream and tee the answer; clients get it before it is written to the store."""
    assert state.upstream is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    redactions = state.settings.policy_for(exchange.cassette).rules.redaction_patterns
    response = await state.upstream.send(
        exchange.method, exchange.route, exchange.query, exchange.headers, exchange.body
    )
    state.count(exchange.cassette, "upstream_calls")
    max_answer = state.settings.max_answer
    async with response:
        keep = forward is not None and storable(response.status, state.settings.record_errors)
        replay_status = ReplayStatus.RECORDED if keep else ReplayStatus.PASSTHROUGH
        headers = live_headers(response.headers)
        if keep and forward is not None and forward.position is not None:
            # This answer joins the sequence as its next recording.
            headers["X-Replay-Sequence"] = (f"{forward.position.occurrence}/"
                                            f"{forward.position.recorded + 1}")
        if not is_event_stream(response.headers):
            try:
                body = await read_body(response, max_answer)
            except AnswerTooLarge as large:
                # Too large to keep: stream it through, storing and holding nothing.
                if keep:
                    _too_large(state, exchange, large.size, max_answer)
                flight.kept = False
                flight.unshare()
                flight.start(Head(response.status, headers, True, ReplayStatus.PASSTHROUGH))
                for part in large.parts:
                    flight.push(part)
                large.parts.clear()
                await _pass_through(flight, response)
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _cut_error(exchange, exc) from exc
            duration_ms = (loop.time() - started) * 1000
            recording = None
            if keep and forward is not None and forward.classify_drift:
                # Refresh: the drift class goes out as a header, so it is decided first.
                recording = classified(forward, existing, body_recording(
                    response.status, response.headers, body, exchange.secrets, duration_ms,
                    redactions))
            flight.push(body)
            flight.start(Head(response.status, headers, False, replay_status,
                              recording.drift if recording else None))
            flight.finish()
            if keep and forward is not None:
                await asyncio.sleep(0)  # the waiting clients send their answers first
                if recording is None:
                    recording = body_recording(response.status, response.headers, body,
                                               exchange.secrets, duration_ms, redactions)
                await commit(state, exchange, existing, recording, forward)
            return

        flight.start(Head(response.status, headers, True, replay_status))
        capture = StreamCapture(started)
        size = 0
        try:
            async for chunk in response.content.iter_any():
                flight.push(chunk)
                size += len(chunk)
                if size > max_answer:
                    if keep:
                        _too_large(state, exchange, size, max_answer)
                    keep = False
                    flight.kept = False
                    flight.unshare()
                    capture.events.clear()
                    await _pass_through(flight, response)
                    return
                capture.feed(chunk)
                flight.settled = capture.done
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FlightCut(f"upstream stream cut: {exc.__class__.__name__}") from exc
        if not stream_complete(capture, response):
            raise FlightCut("upstream stream ended early")
        events = capture.finish()
        flight.finish()
        if keep and forward is not None:
            await asyncio.sleep(0)  # the waiting clients end their answers first
            recording = classified(forward, existing, stream_recording(
                response.status, response.headers, events, exchange.secrets,
                capture.elapsed_ms(), redactions))
            await commit(state, exchange, existing, recording, forward)


# Bytes an answer streamed through may hold for its slowest client before the upstream read
# waits for it.
PASS_THROUGH_BUFFER = 1024 * 1024


async def _pass_through(flight: Flight, response: aiohttp.ClientResponse) -> None:
    """The rest of an answer that is not kept, at the pace of its slowest client."""
    try:
        await flight.drained(PASS_THROUGH_BUFFER)
        async for chunk in response.content.iter_any():
            flight.push(chunk)
            await flight.drained(PASS_THROUGH_BUFFER)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FlightCut(f"upstream answer cut: {exc.__class__.__name__}") from exc
    flight.finish()


def _too_large(state: ProxyState, exchange: Exchange, size: int, max_answer: int) -> None:
    state.count(exchange.cassette, "too_large")
    log.warning("the answer for %s %s (cassette %s, key %s) is over --max-answer (%d bytes, "
                "%d so far): passed through, not stored", exchange.method, exchange.route.route,
                exchange.cassette, exchange.key, max_answer, size)


def _cut_error(exchange: Exchange, exc: BaseException) -> UpstreamError:
    if isinstance(exc, TimeoutError):
        return UpstreamError(
            f"The upstream did not finish its answer for {exchange.route.route} in time "
            "(--upstream-timeout without data, or --upstream-total-timeout in all); nothing "
            "was stored.", status=504, code="upstream_timeout")
    return UpstreamError(
        f"The upstream broke off its answer for {exchange.route.route} mid-body "
        f"({exc.__class__.__name__}); nothing was stored.", code="upstream_cut")


def body_recording(status: int, headers: Mapping[str, str], body: bytes, secrets: tuple[bytes, ...],
                   duration_ms: float, redactions: Sequence[re.Pattern[str]] = ()) -> Recording:
    """A whole-body answer as stored: scrubbed of credentials and of what the user redacts,
    with its fingerprint, model and usage."""
    scrubbed = scrub(body, secrets, redactions)
    fingerprint, model, usage = describe_payload(scrubbed)
    return Recording(status=status, headers=stored_headers(headers), body=scrubbed,
                     system_fingerprint=fingerprint, model=model, usage=usage,
                     recorded_at=now_iso(), duration_ms=duration_ms)


def stream_recording(status: int, headers: Mapping[str, str], events: list[SseEvent],
                     secrets: tuple[bytes, ...], duration_ms: float,
                     redactions: Sequence[re.Pattern[str]] = ()) -> Recording:
    raws = scrub_stream([event.raw for event in events], secrets, redactions)  # split ones too
    scrubbed = tuple(replace(event, raw=raw) for event, raw in zip(events, raws, strict=True))
    fingerprint, model, usage = describe_events(scrubbed)
    return Recording(status=status, headers=stored_headers(headers), events=scrubbed,
                     system_fingerprint=fingerprint, model=model, usage=usage,
                     recorded_at=now_iso(), duration_ms=duration_ms)


def classified(forward: Forward, existing: Entry | None, recording: Recording) -> Recording:
    """In refresh mode, the recording marked same or drift against what the key recorded."""
    if not forward.classify_drift or existing is None:
        return recording
    return replace(recording, drift=fingerprints.classify_against(existing, recording))


async def commit(state: ProxyState, exchange: Exchange, existing: Entry | None,
                 recording: Recording, forward: Forward) -> None:
    """Store the answer as the plan said (a new entry for a new key) and write it."""
    fresh = existing if existing is not None else Entry(
        exchange.key, exchange.route.label, _scrubbed_request(exchange),
        extra={"path": exchange.route.upstream_path,
               **({RULES_CHANGED: True} if exchange.rules_changed else {})})
    entry = stored_entry(forward.storage, existing, fresh, recording, forward.position)
    rules = state.settings.policy_for(exchange.cassette).rules
    entry = replace(entry, rules=rules.describe())
    try:
        await state.store.put(exchange.cassette, entry)
    except Exception as exc:
        # The client has its answer already: say so loudly, count it, keep serving.
        state.count(exchange.cassette, "store_errors")
        log.error("could not store the answer for %s %s (cassette %s, key %s) in %s: %s: %s",
                  exchange.method, exchange.route.route, exchange.cassette, exchange.key,
                  state.store.description, exc.__class__.__name__, exc)
        return
    state.remember(exchange.cassette, entry)
    state.used(exchange.cassette, exchange.key)
    state.count(exchange.cassette, "recorded")
    if recording.drift is not None:
        state.count(exchange.cassette, DRIFT_COUNTERS[recording.drift])


def _scrubbed_request(exchange: Exchange) -> CanonicalRequest:
    text = orjson.dumps(exchange.canonical).decode()
    cleaned = scrub_text(text, exchange.secrets)
    if cleaned == text:
        return exchange.canonical
    loaded: CanonicalRequest = orjson.loads(cleaned)
    return loaded
