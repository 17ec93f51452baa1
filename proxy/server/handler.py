"""The proxy's HTTP handler: parse a request, key it, then replay, record or refuse it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, assert_never
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ..core.canonical import IncomingRequest, Keyed, credential_values, keyed_request
from ..core.cassette import MAX_AT_MS, Recording
from ..core.errors import ProxyError, ReplayMiss
from ..core.explain import RuleNotes, explain_exhausted, explain_fingerprint, explain_miss
from ..core.modes import Mode, resolve_mode
from ..core.plan import (
    FingerprintNotRecorded,
    Forward,
    Miss,
    NotRecorded,
    Passthrough,
    Replay,
    ReplayStatus,
    SequenceExhausted,
    plan,
)
from ..core.providers import (
    Route,
    parse_route,
    split_cassette_prefix,
    split_session_prefix,
    validate_cassette_name,
    validate_session_name,
)
from ..core.routes import is_sequenced, route_class
from ..core.scrub import secret_values
from ..core.settings import Settings
from ..store import Store, open_store
from ..store.state_dir import state_dir
from . import access_log
from .connections import ConnectionLimits, ProxyConnection, ProxyServer, descriptor_room
from .flights import ClientGone, Flight, FlightCut
from .recorder import Exchange, pump, replay_headers
from .serving import loop_name
from .sessions import COUNTING, MAX_FINGERPRINT, MAX_MISS_TEXT, CounterName, MissLog, SessionRecord
from .state import HotKey, HotReply, ProxyState
from .upstream import UPSTREAM_CONNECTIONS, Upstream, client_timeout
from .usage import UsageLog, new_run_id

log = logging.getLogger("replay_proxy")

CASSETTE_HEADER = "x-replay-cassette"
SESSION_HEADER = "x-replay-session"
FINGERPRINT_HEADER = "x-replay-fingerprint"
SEEDED_ROUTES = frozenset({"chat/completions", "completions"})
_UNSAFE_RAW = ("%2f", "%5c", "%2e", "%00")
_MAX_HEADER_BYTES = 64 * 1024


class ReplayProxy:
    """One proxy process: its state, its upstream session, and the handler for every request.

    It runs on aiohttp's low-level server (no router, no middleware): the proxy does its own
    routing, and a replay hit is answered in a few steps.
    """

    def __init__(self, settings: Settings, environ: dict[str, str] | None = None,
                 store: Store | None = None, miss_log: Path | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        self.state = ProxyState(
            settings=settings,
            store=store if store is not None else open_store(settings.store_spec),
            mode=resolve_mode(settings.mode, environ),
            default_session=settings.run_id or new_run_id(),
            miss_log=MissLog(miss_log) if miss_log is not None else None,
        )
        self._session: aiohttp.ClientSession | None = None
        self._flusher: asyncio.Task[None] | None = None

    def server(self) -> web.Server:
        loop = asyncio.get_running_loop()
        max_body = self.state.settings.max_body

        def make_request(message: RawRequestMessage, payload: StreamReader,
                         protocol: RequestHandler, writer: AbstractStreamWriter,
                         task: asyncio.Task[None]) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop,
                                   client_max_size=max_body)

        settings = self.state.settings
        # Beside client connections: the upstream pool, store files, locks, the usage log.
        reserved = UPSTREAM_CONNECTIONS + 64
        limits = ConnectionLimits(header_timeout=settings.header_timeout,
                                  max_connections=descriptor_room(settings.max_connections,
                                                                  reserved))
        # The handler is _handle itself, no wrapper coroutine on the path of every request, unless
        # info logging asks for one line per request.
        handler = access_log.wrap(functools.partial(_handle, self.state))
        return ProxyServer(handler, limits, request_factory=make_request, access_log=None,
                           max_field_size=_MAX_HEADER_BYTES, max_line_size=_MAX_HEADER_BYTES)

    async def start(self) -> None:
        state = self.state
        self._session = aiohttp.ClientSession(
            timeout=client_timeout(state.settings), auto_decompress=True,
            connector=aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, force_close=False),
            # One session serves every client: an upstream cookie must never pass between them.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        state.upstream = Upstream(state.settings, self._session)
        state.usage = UsageLog(state_dir(state.settings.cassettes), run=state.default_session)
        self._flusher = asyncio.get_running_loop().create_task(_flush_usage(state))

    async def stop(self) -> None:
        state = self.state
        await state.stop_warming()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await state.flights.close()
        await state.misses.close()
        if state.usage is not None:
            state.usage.flush(state.snapshot())
        if self._session is not None:
            await self._session.close()
        await state.store.close()
        if state.miss_log is not None:
            state.miss_log.close()


class ProxyRunner(web.BaseRunner):
    """Serves a ReplayProxy on aiohttp's sites (TCPSite, SO_REUSEPORT) and shuts it down."""

    def __init__(self, proxy: ReplayProxy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proxy = proxy

    async def shutdown(self) -> None:
        pass

    async def _make_server(self) -> web.Server:
        await self.proxy.start()
        return self.proxy.server()

    async def _cleanup_server(self) -> None:
        await self.proxy.stop()


async def _flush_usage(state: ProxyState, every: float = 1.0) -> None:
    last: dict[CounterName, int] = {}
    while True:
        await asyncio.sleep(every)
        if state.usage is not None and dict(state.totals) != last:
            last = dict(state.totals)
            state.usage.flush(state.snapshot())


# The proxy's own errors that a retry can cure: the upstream was unreachable, slow or cut off
# (as the SDK would retry against the real API), or the shared store was out of reach. A miss,
# a bad request or a corrupt cassette gives the same answer every time: do not retry.
_RETRYABLE = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_cut",
                        "store_unavailable"})


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> web.Response:
    retry = "true" if exc.code in _RETRYABLE else "false"
    all_headers = {"X-Replay-Status": ReplayStatus.ERROR, "x-should-retry": retry,
                   **(headers or {})}
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json",
                        headers=all_headers)


_INTERNAL_PREFIX = "/_replay/"


_SESSIONS_PREFIX = "/_replay/sessions/"
_MAX_WARM_BODY = 8 * 1024 * 1024


async def _internal(state: ProxyState, request: web.BaseRequest) -> web.Response:
    """The proxy's own endpoints: GET /_replay/health, GET /_replay/stats,
    POST /_replay/reset[?session=ID] (the default session unless one is named),
    GET and PUT /_replay/sessions/<id> (a session's counters; its own mode and fingerprint),
    and POST /_replay/warm (cassettes to read ahead)."""
    route = (request.method, request.path)
    if request.path.startswith(_SESSIONS_PREFIX):
        return await _session_endpoint(state, request)
    if route == ("GET", "/_replay/health"):
        payload: object = {"status": "ok", "mode": state.mode.value,
                           "store": state.store.description,
                           "cassettes": str(state.settings.cassettes),
                           "loop": loop_name(asyncio.get_running_loop()),
                           "pid": os.getpid(), "session": state.default_session}
    elif route == ("GET", "/_replay/stats"):
        payload = {**state.snapshot(), "memory": state.memory()}
    elif route == ("POST", "/_replay/reset"):
        named = request.rel_url.query.get("session")
        session = validate_session_name(named) if named is not None else state.default_session
        await state.store.reset_session(session)
        payload = {"session": session, "reset": True}
    elif route == ("POST", "/_replay/warm"):
        names = _json_body(await request.read(), _MAX_WARM_BODY).get("cassettes")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ProxyError('POST /_replay/warm takes {"cassettes": ["name", ...]}.',
                             code="invalid_warm")
        payload = {"queued": state.warm(validate_cassette_name(name) for name in names)}
    else:
        raise ProxyError(
            f"Invalid URL ({request.method} {request.path}). replay-proxy's own endpoints are "
            "GET /_replay/health, GET /_replay/stats, POST /_replay/reset, "
            "GET and PUT /_replay/sessions/<id> and POST /_replay/warm.",
            status=404, code="unknown_url")
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def _session_endpoint(state: ProxyState, request: web.BaseRequest) -> web.Response:
    """GET: the session's counters and last miss, once the flights it started are stored.
    PUT {"mode": ..., "fingerprint": ...}: how its requests are answered from now on."""
    name = validate_session_name(request.path.removeprefix(_SESSIONS_PREFIX))
    if request.method == "GET":
        record = state.sessions.get(name)
        if record is None:
            record = SessionRecord()  # a session that made no request yet: all zero
        elif record.pumps:
            await asyncio.wait(set(record.pumps))  # (never cancels them, unlike gather)
    elif request.method == "PUT":
        wanted = _json_body(await request.read(), 64 * 1024)
        mode, fingerprint = wanted.get("mode"), wanted.get("fingerprint")
        choices = [m.value for m in Mode if m is not Mode.AUTO]
        if mode is not None and mode not in choices:
            raise ProxyError(f"A session's mode is one of {', '.join(choices)}, or null.",
                             code="invalid_session_options", param="mode")
        if fingerprint is not None and not (isinstance(fingerprint, str)
                                            and 0 < len(fingerprint) <= MAX_FINGERPRINT):
            raise ProxyError("A session's fingerprint is pinned, latest or a fingerprint value "
                             f"of at most {MAX_FINGERPRINT} characters, or null.",
                             code="invalid_session_options", param="fingerprint")
        record = state.sessions.record(name)
        record.mode = Mode(mode) if mode is not None else None
        record.fingerprint = fingerprint
        state.forget_hot()  # replies resolved before were resolved for the old options
    else:
        raise ProxyError(f"{request.method} {_SESSIONS_PREFIX}<id>: use GET or PUT.",
                         status=405, code="method_not_allowed")
    return web.Response(body=orjson.dumps(record.payload(name)),
                        content_type="application/json")


def _json_body(body: bytes, limit: int) -> dict[str, Any]:
    if len(body) > limit:
        raise ProxyError(f"The body is larger than {limit} bytes.", status=413,
                         code="request_too_large")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(f"The body is not JSON ({exc}).", code="invalid_json") from exc
    if not isinstance(parsed, dict):
        raise ProxyError("The body is a JSON object.", code="invalid_json")
    return parsed


async def _handle(state: ProxyState, request: web.BaseRequest) -> web.StreamResponse:
    try:
        if state.settings.auth_token is not None:
            _authorise(request, state.settings.auth_token)
        if "Expect" in request.headers:
            await _expect(request, state.settings.max_body)
        body = await request.read()  # client_max_size is --max-body: over it, a 413 below
        hot_key = (request.method, request.raw_path, body,
                   *map(request.headers.get, state.hot_headers))
        hot = state.hot.get(hot_key)
        if hot is not None:  # the fast path: a byte-identical request resolved before
            hot.counts["hits"] += 1  # (its key is already in the usage log)
            hot.counts["hot_hits"] += 1  # answered without parsing or keying
            if hot.tokens:
                hot.counts["tokens_replayed"] += hot.tokens
            if hot.session_counts is not None:
                hot.session_counts["hits"] += 1
                if hot.tokens:
                    hot.session_counts["tokens_replayed"] += hot.tokens
            recording = hot.recording
            if recording.events is None:
                return web.Response(status=recording.status, body=recording.body,
                                    headers=hot.headers)
            return await _replay(state, request, recording, hot.headers)
        return await _serve(request, state, body, hot_key)
    except ProxyError as exc:
        return error_response(exc)
    except (web.HTTPRequestEntityTooLarge, _TooLarge) as exc:
        response = error_response(ProxyError(
            f"The request body is larger than --max-body ({state.settings.max_body} bytes); "
            "raise --max-body to proxy larger requests.", status=413, code="request_too_large"))
        if isinstance(exc, _TooLarge):
            response.force_close()  # the body was never asked for: the connection cannot go on
        return response
    except (ContentEncodingError, RequestPayloadError) as exc:
        return error_response(ProxyError(
            f"The request body could not be read ({exc}); if it has a Content-Encoding "
            f"({request.headers.get('Content-Encoding', 'none')}), it must decode.",
            code="invalid_body_encoding"))
    except web.HTTPException as exc:
        reason = exc.text or exc.reason
        return error_response(ProxyError(reason, status=exc.status, code=f"http_{exc.status}"))
    except Exception as exc:
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return error_response(ProxyError(
            f"replay-proxy hit an internal error ({exc.__class__.__name__}: {exc}). Nothing was "
            "stored for this request; please report it with the proxy's log.",
            status=500, type="server_error", code="proxy_internal_error",
        ))


def _count_hit(state: ProxyState, cassette: str, key: str, tokens: int) -> None:
    state.count(cassette, "hits")
    if tokens:
        state.count(cassette, "tokens_replayed", tokens)
    state.used(cassette, key)


async def _serve(request: web.BaseRequest, state: ProxyState, body: bytes,
                 hot_key: HotKey) -> web.StreamResponse:
    if request.path.startswith(_INTERNAL_PREFIX):
        return await _internal(state, request)
    cassette, session, route, query = _locate(request, state)
    # Every count made for this request, in its flight's pump too, also goes to its session
    # (aiohttp gives each request a task of its own: this is set for this request only).
    record = state.sessions.record(session) if session != state.default_session else None
    COUNTING.set(record)
    try:
        response = await _answer(request, state, body, hot_key, cassette, session, record,
                                 route, query)
    except ProxyError as exc:
        if exc.status >= 500:
            state.note_failure(cassette, session, exc.status, exc.message)
        raise
    except Exception as exc:
        state.note_failure(cassette, session, 500,
                           f"internal error ({exc.__class__.__name__}: {exc})")
        raise
    if (response.status >= 500 and isinstance(response, web.Response)
            and response.headers.get("X-Replay-Status") == ReplayStatus.ERROR):
        # The proxy's own answer (the upstream out of reach, the store down), not the
        # provider's: nothing was replayed or recorded for this request.
        state.note_failure(cassette, session, response.status,
                           _error_message(response.body))
    return response


def _error_message(body: object) -> str:
    """The message of an error body in the OpenAI shape (the body itself if it is not one)."""
    raw = body if isinstance(body, bytes) else b""
    try:
        message = orjson.loads(raw)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw[:MAX_MISS_TEXT].decode(errors="replace")
    return str(message)


async def _answer(request: web.BaseRequest, state: ProxyState, body: bytes, hot_key: HotKey,
                  cassette: str, session: str, record: SessionRecord | None, route: Route,
                  query: dict[str, str]) -> web.StreamResponse:
    """Replay, record or refuse one located request."""
    settings = state.settings
    # aiohttp has already decoded a compressed request body: key and forward it as plain bytes.
    headers = {name.lower(): value for name, value in request.headers.items()
               if name.lower() != "content-encoding"}
    body = _inject_seed(route, body, settings.inject_seed)
    incoming = IncomingRequest(request.method, route, tuple(query.items()), headers, body)
    keyed = keyed_request(incoming, settings.policy_for(cassette))
    canonical, key = keyed.canonical, keyed.key
    base_headers = {"X-Replay-Key": key, "X-Replay-Cassette": cassette}
    mode = state.mode_for(cassette, record)
    policy = state.fingerprint_for(cassette, headers.get(FINGERPRINT_HEADER), record)
    klass = route_class(request.method, route.route, canonical.get("body"))
    sequenced = mode is not Mode.PASSTHROUGH and is_sequenced(klass, settings.sequence)
    entry = None
    if mode in (Mode.RECORD, Mode.REPLAY):
        entry = await state.entry(cassette, key, route.label)
    occurrence = await state.store.claim_occurrence(session, cassette, key) if sequenced else None
    stale_before = _stale_before(settings)
    decision = plan(mode, entry, fingerprint=policy, occurrence=occurrence, method=request.method,
                    stale_before=stale_before)

    match decision:
        case Replay():
            recording = decision.recording
            usage = recording.usage or {}
            tokens = usage["total_tokens"] if isinstance(usage.get("total_tokens"), int) else 0
            reply_headers = {**replay_headers(settings, decision), **base_headers,
                             "X-Replay-Status": ReplayStatus.HIT}
            if decision.stale:  # older than --max-age: replayed, and counted for the summary
                state.count(cassette, "stale")
            elif decision.position is None:  # an answer that never changes: answer it at once
                state.remember_hot(hot_key, HotReply(
                    cassette, key, recording, reply_headers, tokens, state.counts_for(cassette),
                    session_counts=record.counts if record is not None else None))
            _count_hit(state, cassette, key, tokens)
            return await _replay(state, request, recording, reply_headers)
        case Miss():
            if occurrence is not None:
                await state.store.release_occurrence(session, cassette, key)
            state.count(cassette, "misses")
            error = await _miss_error(state, decision, cassette, session, keyed, route)
            state.note_miss(cassette, session, record, error.message)
            return error_response(error, {**base_headers, "X-Replay-Status": ReplayStatus.MISS})
        case Forward() | Passthrough():
            forward = decision if isinstance(decision, Forward) else None
            exchange = Exchange(
                cassette=cassette, key=key, route=route, method=request.method, query=query,
                headers=headers, body=body, canonical=canonical, forward=forward, mode=mode,
                fingerprint=policy, occurrence=occurrence, stale_before=stale_before,
                rules_changed=bool(keyed.changed or keyed.dropped),
                secrets=tuple(secret_values(headers, settings, credential_values(query.items()))),
            )
            if forward is None:
                flight_name = f"pass\x1f{id(request)}"
            elif occurrence is None:
                flight_name = f"{cassette}\x1f{key}"
            else:  # the n-th request of a sequence: one upstream call per occurrence
                flight_name = f"{cassette}\x1f{key}\x1f{occurrence}"
            flight = state.flights.join(flight_name, lambda flight: pump(state, exchange, flight))
            if record is not None and flight.followers == 1 and flight.pump is not None:
                record.pumps.add(flight.pump)  # this session's: its counters wait for it
                flight.pump.add_done_callback(record.pumps.discard)
            response = await _follow(state, request, flight, base_headers)
            if occurrence is not None and not _joined_sequence(flight):
                # Not stored (an upstream error, a cut): a retry takes this place instead.
                await state.store.release_occurrence(session, cassette, key)
            return response
        case _:
            assert_never(decision)


def _joined_sequence(flight: Flight) -> bool:
    """Whether the flight's answer is now part of its key's sequence (replayed or stored)."""
    head = flight.head
    return (flight.error is None and flight.kept and head is not None
            and head.replay_status in (ReplayStatus.HIT, ReplayStatus.RECORDED))


def _stale_before(settings: Settings) -> str | None:
    """With --max-age, the ISO time before which a recording is stale."""
    if settings.max_age is None:
        return None
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.max_age)
    return cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _miss_error(state: ProxyState, miss: Miss, cassette: str, session: str,
                      keyed: Keyed, route: Route) -> ReplayMiss:
    canonical, key = keyed.canonical, keyed.key
    reason = miss.reason
    say = state.settings.option_spelling
    match reason:
        case NotRecorded():
            # The nearest few from the cassette's index, built off the event loop.
            candidates = await state.misses.candidates(cassette, canonical)
            notes = RuleNotes(state.settings.policy_for(cassette).rules, keyed.changed,
                              keyed.dropped)
            return ReplayMiss(explain_miss(cassette, canonical, key, candidates or [], say,
                                           indexing=candidates is None, notes=notes))
        case FingerprintNotRecorded():
            return ReplayMiss(explain_fingerprint(cassette, str(canonical.get("method")),
                                                  route.route, key, reason, say),
                              code="fingerprint_not_recorded")
        case SequenceExhausted():
            return ReplayMiss(explain_exhausted(cassette, route.route, key, session, reason, say),
                              code="sequence_exhausted")
        case _:
            assert_never(reason)


async def _expect(request: web.BaseRequest, max_body: int) -> None:
    """Answer `Expect: 100-continue`: go on, or refuse a body over --max-body before it is sent."""
    if request.headers["Expect"].lower() != "100-continue":
        raise ProxyError(f"Unsupported Expect header ({request.headers['Expect']}); only "
                         "100-continue is supported.", status=417, code="expectation_failed")
    if request.content_length is not None and request.content_length > max_body:
        raise _TooLarge()
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class _TooLarge(Exception):
    """A declared body over --max-body, refused before it is read."""


def _authorise(request: web.BaseRequest, token: str) -> None:
    presented = request.headers.get("api-key") or ""
    authorization = request.headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    # In constant time: how long the comparison takes says nothing about the token.
    if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                               token.encode("utf-8", "surrogateescape")):
        raise ProxyError(
            "This replay-proxy requires its access token: pass the value of --auth-token as "
            "your API key (Authorization: Bearer <token> or api-key: <token>).",
            status=401, code="invalid_proxy_token",
        )


def _locate(request: web.BaseRequest, state: ProxyState
            ) -> tuple[str, str, Route, dict[str, str]]:
    """(cassette, session, route, query) of a request."""
    settings = state.settings
    session, raw_path = split_session_prefix(request.rel_url.raw_path)
    if session is None:
        header = request.headers.get(SESSION_HEADER)
        session = validate_session_name(header) if header is not None else state.default_session
    cassette, api_path = split_cassette_prefix(raw_path)
    if cassette is None:
        header = request.headers.get(CASSETTE_HEADER)
        cassette = validate_cassette_name(header) if header is not None else settings.default_cassette
    query = {name: value for name, value in request.rel_url.query.items()}
    route = None
    if not any(marker in api_path.lower() for marker in _UNSAFE_RAW):
        route = parse_route(unquote(api_path), query)
    if route is None:
        raise ProxyError(
            f"Invalid URL ({request.method} {request.rel_url.path}). replay-proxy serves the "
            "OpenAI API under /v1/... and Azure OpenAI under /openai/...; set OPENAI_BASE_URL to "
            "http://HOST:PORT/v1 (or /c/<cassette>/v1).",
            status=404, code="unknown_url",
        )
    return cassette, session, route, query


def _inject_seed(route: Route, body: bytes, seed: int | None) -> bytes:
    """With --inject-seed, add `seed` to chat and completions requests that lack one."""
    if seed is None or route.route not in SEEDED_ROUTES or not body.startswith(b"{"):
        return body
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(parsed, dict) or parsed.get("seed") is not None:
        return body
    parsed["seed"] = seed
    return orjson.dumps(parsed)


async def _replay(state: ProxyState, request: web.BaseRequest, recording: Recording,
                  headers: dict[str, str]) -> web.StreamResponse:
    if recording.events is None or request.method == "HEAD":
        # (A HEAD answer has no body: aiohttp drops a Response's, but would write a stream's
        # events unframed onto the connection.)
        return web.Response(status=recording.status, body=recording.body, headers=headers)
    speed = state.settings.replay_timing.speed
    if speed == 0:
        # --replay-timing none: the same bytes, chunked as a provider's stream is, in one write
        # with the head (a streamed response would send its head on its own first).
        whole = web.Response(status=recording.status, headers=headers,
                             body=b"".join(event.raw for event in recording.events))
        if request.version >= HttpVersion11:  # (HTTP/1.0 has no chunks: a length instead)
            whole.enable_chunked_encoding()
        return whole
    response = web.StreamResponse(status=recording.status, headers=headers)
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for event in recording.events:
            if speed > 0:
                # Loading refuses any other at_ms; bounded here too, whatever made the event.
                at_ms = min(event.at_ms, MAX_AT_MS) if math.isfinite(event.at_ms) else 0.0
                delay = started + at_ms / 1000 / speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await response.write(event.raw)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left, maybe right after the last event: nothing to report
    return response


async def _follow(state: ProxyState, request: web.BaseRequest, flight: Flight,
                  base_headers: dict[str, str]) -> web.StreamResponse:
    flights = state.flights
    # aiohttp does not cancel a handler whose client has gone, so the flight is told: with no
    # client left it cancels the upstream call instead of reading an answer nobody wants.
    gone = request.protocol.gone() if isinstance(request.protocol, ProxyConnection) else None
    if gone is not None:
        gone.add_done_callback(flight.wake)
    try:
        try:
            head = await flight.wait_head(gone)
        except ProxyError as exc:
            return error_response(exc, base_headers)
        headers = {**head.headers, **base_headers, "X-Replay-Status": head.replay_status}
        if head.drift:
            headers["X-Replay-Drift"] = head.drift
        if not head.is_stream or request.method == "HEAD":  # a HEAD answer has no body
            # (A whole body is in the flight before its head.)
            return web.Response(status=head.status, body=b"".join(flight.chunks), headers=headers)
        response = web.StreamResponse(status=head.status, headers=headers)
        await response.prepare(request)
        try:
            # Closed at once when the client leaves: its place in the flight is let go.
            async with contextlib.aclosing(flight.follow(gone)) as chunks:
                async for chunk in chunks:
                    await response.write(chunk)
        except FlightCut:
            # Show the client the cut as it happened: close without the final chunk.
            if request.transport is not None:
                request.transport.abort()
            return response
        except (ConnectionError, ClientGone):
            return response
        # The client may leave right after the last event: nothing to report then.
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
    except ClientGone:
        return web.Response(status=499)  # never sent: there is nobody to send it to
    finally:
        if gone is not None:
            gone.remove_done_callback(flight.wake)
        flights.leave(flight)
