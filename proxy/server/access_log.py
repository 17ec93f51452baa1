"""One log line per request at `--log-level info`: what was asked and how it was answered.

`wrap` puts a thin coroutine around the proxy's handler only when the access logger is enabled
for INFO; otherwise it returns the handler as it is, and the hot path pays nothing. The line is
built from the request's method and path and from what the handler put in its answer
(`X-Replay-Status`, `X-Replay-Key`, `X-Replay-Cassette`, the status): never from a request
header, never from the query string (Azure clients may send `api-key` there), so no credential
can reach the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from ..core.plan import ReplayStatus

LOGGER = "replay_proxy.access"
log = logging.getLogger(LOGGER)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Statuses whose HTTP status is the upstream's own (a hit or a miss never reached it).
_FORWARDED = frozenset({ReplayStatus.RECORDED, ReplayStatus.PASSTHROUGH})


@dataclass(frozen=True)
class Access:
    """One answered request, as logged."""

    method: str
    path: str
    cassette: str | None
    key: str | None  # the first 16 characters
    replay_status: str  # a ReplayStatus, as the answer's header says; `-` when it has none
    status: int
    upstream_status: int | None
    ms: float

    def text(self) -> str:
        return (f"{self.method} {self.path} cassette={self.cassette or '-'} key={self.key or '-'} "
                f"{self.replay_status} status={self.status} "
                f"upstream={self.upstream_status or '-'} {self.ms:.1f}ms")


def wrap(handler: Handler) -> Handler:
    if not log.isEnabledFor(logging.INFO):
        return handler

    async def logged(request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        headers = response.headers
        replay_status = headers.get("X-Replay-Status", "-")
        key = headers.get("X-Replay-Key")
        access = Access(
            method=request.method, path=request.path, cassette=headers.get("X-Replay-Cassette"),
            key=key[:16] if key else None, replay_status=replay_status, status=response.status,
            upstream_status=response.status if replay_status in _FORWARDED else None,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        log.info("%s", access.text(), extra={"access": access})
        return response

    return logged


class JsonLines(logging.Formatter):
    """`--log-format json`: one JSON object per line; a request's line carries its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, Access):
            line.update(asdict(access))
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class Misses(logging.Handler):
    """Keeps the requests that missed (up to `limit`), for the summary at shutdown."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__(logging.INFO)
        self.limit = limit
        self.found: list[Access] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        access = getattr(record, "access", None)
        if not isinstance(access, Access) or access.replay_status != ReplayStatus.MISS:
            return
        if len(self.found) < self.limit:
            self.found.append(access)
        else:
            self.dropped += 1
