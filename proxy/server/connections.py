"""The client connections themselves: how long a client may take to send a request head, how
many connections are open at once, malformed requests answered in the OpenAI error shape, and
a way for a handler to notice that its client has gone.

aiohttp's low-level server keeps a connection that never completes its request head open for
as long as its keep-alive timeout (an hour by default), and answers parser errors in plain
text with a logged traceback. A proxy that a fleet shares must not run out of descriptors
because of slow or hostile clients, so each connection here has a head deadline, and past
`--max-connections` a new connection is answered 503 as soon as its head arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..core.errors import error_body
from ..core.plan import ReplayStatus

log = logging.getLogger("replay_proxy")

# A connection over the limit is answered at once; it gets only this long to send its head.
_OVER_LIMIT_HEAD_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds from connecting (or a request's first byte) to its full head
    max_connections: int
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this


def descriptor_room(wanted: int, reserved: int) -> int:
    """The client connections this process can hold: `wanted`, raising the soft limit on open
    descriptors toward the hard one if need be, or as many as the limit leaves room for beside
    `reserved` other descriptors. Past the descriptor limit a connection cannot even be
    accepted and the client is reset; within it, it gets a 503."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to read or raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + reserved
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    room = max(16, soft - reserved)
    log.warning("--max-connections %d is more than %d open descriptors (ulimit -n) leave room "
                "for; serving at most %d connections", wanted, soft, room)
    return room


class ProxyServer(web.Server):
    """aiohttp's low-level server, making `ProxyConnection`s."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self.limits = limits

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def __call__(self) -> RequestHandler:
        return ProxyConnection(self, loop=self._loop, **self._kwargs)


# Called directly: on the path of every request, `super()` costs more than the rest.
_receive = RequestHandler.data_received


class ProxyConnection(RequestHandler):
    __slots__ = ("_body", "_count_at_head", "_gone", "_head_since", "_head_timeout",
                 "_head_timer")

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = manager.limits.header_timeout
        self._head_since: float | None = None  # when the pending request head began
        self._count_at_head = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future[None] | None = None
        self._body: Any = None  # the payload of the latest request head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        assert isinstance(manager, ProxyServer)
        if manager.open_connections > manager.limits.max_connections:
            # Read the head (so the answer is not lost to a reset), then refuse and close.
            self._request_handler = _refuse_over_limit
            self._head_timeout = min(self._head_timeout, _OVER_LIMIT_HEAD_S)
        # A connection that sends nothing at all is a head that never completes.
        self._head_since = self._loop.time()
        self._arm(self._head_since + self._head_timeout)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        _receive(self, data)
        if self._request_count != count:
            self._head_since = None  # a whole head arrived
            self._body = self._messages[-1][1] if self._messages else None
        elif self._head_since is None and data and not self._request_in_progress and (
                self._body is None or self._body.is_eof()):
            self._head_since = self._loop.time()  # the first bytes of the next request
            self._count_at_head = count
            if self._head_timer is None:
                self._arm(self._head_since + self._head_timeout)

    def _arm(self, when: float) -> None:
        self._head_timer = self._loop.call_at(when, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self._force_close or self.transport is None:
            return
        if self._request_in_progress or self._request_count != self._count_at_head:
            self._head_since = None
            return
        deadline = since + self._head_timeout
        if self._loop.time() < deadline:
            self._arm(deadline)
            return
        log.info("closed a connection from %s that sent no whole request head within %g s",
                 _peer(self.transport), self._head_timeout)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        super().connection_lost(exc)

    def gone(self) -> asyncio.Future[None]:
        """A future that is done once the client's connection is closed."""
        if self._gone is None:
            self._gone = self._loop.create_future()
            if self.transport is None:
                self._gone.set_result(None)
        return self._gone

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request the parser refused (or an error past the handler): the OpenAI error shape,
        one log line, no traceback; the connection closes after it."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is closed instead")
        detail = message or (str(exc) if exc is not None else "") or "malformed request"
        if status >= 500:  # not the client's doing: the traceback is wanted
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.warning("refused a malformed request from %s: %s", request.remote, detail)
        if status >= 500:
            text = ("replay-proxy could not handle the request; nothing was stored. Please "
                    "report it with the proxy's log.")
            body = error_body(text, "server_error", "proxy_internal_error")
        else:
            text = (f"The request could not be parsed as HTTP/1.1 ({detail}). Check the client: "
                    "its request line and headers must be well-formed.")
            body = error_body(text, "invalid_request_error", "malformed_request")
        response = web.Response(status=status, body=body, content_type="application/json",
                                headers={"X-Replay-Status": ReplayStatus.ERROR,
                                         "x-should-retry": "false"})
        response.force_close()
        return response


async def _refuse_over_limit(request: web.BaseRequest) -> web.StreamResponse:
    manager = request.protocol._manager
    limit = manager.limits.max_connections if isinstance(manager, ProxyServer) else 0
    body = error_body(
        f"replay-proxy has {limit} connections open, its --max-connections; this one is "
        "refused. Retry shortly, or raise --max-connections.",
        "server_error", "too_many_connections")
    response = web.Response(status=503, body=body, content_type="application/json",
                            headers={"X-Replay-Status": ReplayStatus.ERROR,
                                     "x-should-retry": "true", "Retry-After": "1"})
    response.force_close()
    return response


def _peer(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"
