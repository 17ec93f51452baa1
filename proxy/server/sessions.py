"""What each named session did, and how it asked to be answered: counters, its last miss, and
its own mode or fingerprint. The pytest plugin names one session per test, so these are a
test's counters, asked for only when the test wants them (`GET /_replay/sessions/<id>`).

A request's session is known where it is located; the counters of everything done for it,
in the handler and in the flight it starts (the recorder counts upstream calls, recordings and
store errors there), reach its record through `COUNTING`, a context variable that the flight's
pump task inherits from the request that started it. The table is bounded: the oldest
sessions are let go past `MAX_SESSIONS`, or past `MAX_MISS_BYTES` of kept explanations.

The miss log, when a proxy is given one, gets a line per replay miss as it is answered, before
the client reads the 404, and one per error of the proxy's own (kind `error`: the upstream out
of reach, a corrupt cassette, a failing hook): a test runner learns of a miss or an error the
code under test swallowed by looking at the file's size, with no request to the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from ..core.cassette import Drift
from ..core.fingerprints import FingerprintChoice
from ..core.modes import Mode

log = logging.getLogger("replay_proxy")

MAX_SESSIONS = 4096
MAX_MISS_TEXT = 4096  # characters of a session's last explanation kept in memory
MAX_MISS_BYTES = 4 * 1024 * 1024  # of all kept explanations together
MAX_MISS_LOG_BYTES = 32 * 1024 * 1024  # past it, the log's lines name the session only
MAX_FINGERPRINT = 200
# What a proxy counts, per cassette and per session: /_replay/stats, the run files, summaries.
CounterName = Literal["hits", "hot_hits", "misses", "recorded", "stale", "upstream_calls",
                      "store_errors", "too_large", "tokens_replayed", "errors",
                      "same", "drift:fingerprint", "drift:output"]
# A refresh counts each answer by how it compared with the recording (`Drift`'s values).
DRIFT_COUNTERS: Final[dict[Drift, CounterName]] = {
    Drift.SAME: "same", Drift.FINGERPRINT: "drift:fingerprint", Drift.OUTPUT: "drift:output",
}
# The counters a session reports (zero when nothing happened).
SESSION_COUNTERS: tuple[CounterName, ...] = (
    "hits", "misses", "recorded", "upstream_calls", "store_errors", "too_large",
    "tokens_replayed", "errors")


@dataclass
class SessionRecord:
    counts: Counter[CounterName] = field(default_factory=Counter)
    last_miss: str | None = None
    mode: Mode | None = None  # resolved: never AUTO
    fingerprint: FingerprintChoice | None = None
    # Flights this session started, until they are stored: its counters are final after them.
    pumps: set[asyncio.Task[None]] = field(default_factory=set)

    def payload(self, name: str) -> dict[str, Any]:
        return {"session": name, **{counter: self.counts[counter] for counter in SESSION_COUNTERS},
                "last_miss": self.last_miss,
                "mode": self.mode.value if self.mode is not None else None,
                "fingerprint": self.fingerprint}


# The record that counts made while serving a request also go to (None: the default session).
COUNTING: ContextVar[SessionRecord | None] = ContextVar("replay_proxy_session", default=None)


class Sessions:
    """Named sessions, oldest first; bounded by count and by the bytes of kept explanations."""

    def __init__(self, limit: int = MAX_SESSIONS, miss_bytes: int = MAX_MISS_BYTES) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._limit = limit
        self._miss_budget = miss_bytes
        self._miss_bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name: str) -> SessionRecord | None:
        return self._records.get(name)

    def record(self, name: str) -> SessionRecord:
        found = self._records.get(name)
        if found is None:
            while len(self._records) >= self._limit:
                self._evict()
            found = self._records[name] = SessionRecord()
        return found

    def note_miss(self, record: SessionRecord, message: str) -> None:
        kept = message if len(message) <= MAX_MISS_TEXT else message[:MAX_MISS_TEXT - 3] + "..."
        self._miss_bytes += len(kept) - len(record.last_miss or "")
        record.last_miss = kept
        while self._miss_bytes > self._miss_budget and len(self._records) > 1:
            self._evict()

    def _evict(self) -> None:
        oldest = next(iter(self._records))
        self._miss_bytes -= len(self._records.pop(oldest).last_miss or "")
        self.evicted += 1


class MissLog:
    """An append-only file of the misses and the proxy's own errors answered: one JSON line
    each (session, cassette, kind, explanation), written before the answer is sent. Past `limit` bytes a line no longer carries
    the explanation (the session's record still does)."""

    def __init__(self, path: Path, limit: int = MAX_MISS_LOG_BYTES) -> None:
        self.path = path
        self._limit = limit
        self._written = 0
        self._failing = False
        # Opened for appending and written unbuffered: a reader polls its size.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, session: str, cassette: str, message: str, kind: str = "miss") -> None:
        line: dict[str, Any] = {"session": session, "cassette": cassette, "kind": kind}
        if self._written < self._limit:
            line["message"] = message[:MAX_MISS_TEXT]
        data = orjson.dumps(line) + b"\n"
        try:
            os.write(self._fd, data)
        except OSError as exc:
            if not self._failing:
                log.warning("could not write the miss log %s: %s", self.path, exc)
            self._failing = True
            return
        self._written += len(data)

    def close(self) -> None:
        os.close(self._fd)
