"""What a running proxy holds: settings, store, in-flight calls, recent entries and counters."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import orjson

from ..core.cassette import Entry, Recording, is_key, is_label
from ..core.errors import ProxyError
from ..core.fingerprints import FingerprintChoice
from ..core.modes import Mode
from ..core.settings import Settings
from ..store import Store
from ..store.directory import DirectoryStore
from ..store.diskcache_store import DiskcacheStore
from .flights import SingleFlight
from .misses import MissIndex
from .sessions import COUNTING, CounterName, MissLog, SessionRecord, Sessions
from .upstream import Upstream
from .usage import UsageLog, new_run_id

MIB = 1024 * 1024
# Shares of --cache-mb: entries read or recorded, replies to byte-identical requests (their
# keys hold request bodies), and the miss indexes (see `misses`).
ENTRIES_SHARE, HOT_SHARE, INDEX_SHARE = 0.4, 0.4, 0.2
# Cassettes whose counters are kept one by one; older ones are folded into `retired`, so the
# totals stay whole however many cassette names clients make up.
COUNTED_CASSETTES = 4096
# Cassettes a proxy may be asked to read ahead (`warm`), and the share of the entries' memory
# they may fill: the rest stays for what requests read.
MAX_WARM_CASSETTES = 100_000
WARM_SHARE = 0.5


@dataclass(frozen=True)
class CassetteOptions:
    """Per-cassette overrides, set by the pytest plugin for one test."""

    mode: Mode | None = None
    fingerprint: FingerprintChoice | None = None


@dataclass(frozen=True)
class HotReply:
    """A hit resolved once, replayed again for the byte-identical request without re-keying."""

    cassette: str
    key: str
    recording: Recording
    headers: dict[str, str]
    tokens: int
    counts: Counter[CounterName]  # the cassette's counters, so a hit counts itself without lookups
    size: int = 0  # bytes it holds, with its key: set by remember_hot
    session_counts: Counter[CounterName] | None = None  # the named session's, likewise


def recording_size(recording: Recording) -> int:
    """Roughly the bytes a recording holds in memory (a bound, not a measure)."""
    events = recording.events
    streamed = sum(len(event.raw) for event in events) + 200 * len(events) if events else 0
    return 1024 + len(recording.body) + streamed


def entry_size(entry: Entry) -> int:
    request = len(orjson.dumps(entry.request))
    return 4096 + request + sum(recording_size(recording) for recording in entry.recordings)


HotKey = tuple[object, ...]


@dataclass
class ProxyState:
    settings: Settings
    store: Store
    mode: Mode  # resolved: never AUTO
    # The session of requests that name none: this run, shared by the workers of one `serve`.
    default_session: str = field(default_factory=new_run_id)
    upstream: Upstream | None = None
    flights: SingleFlight = field(default_factory=SingleFlight)
    overrides: dict[str, CassetteOptions] = field(default_factory=dict)
    by_cassette: dict[str, Counter[CounterName]] = field(default_factory=dict)
    usage: UsageLog | None = None
    last_miss: dict[str, str] = field(default_factory=dict)
    hot: dict[HotKey, HotReply] = field(default_factory=dict)
    # Counts of cassettes whose counters were let go (COUNTED_CASSETTES), part of the totals.
    retired: Counter[CounterName] = field(default_factory=Counter)
    retired_cassettes: int = 0
    counted_cassettes: int = COUNTED_CASSETTES
    _hot_bytes: int = 0
    _entries: dict[tuple[str, str], tuple[Entry, int]] = field(default_factory=dict)
    _entries_bytes: int = 0
    misses: MissIndex = field(init=False)
    sessions: Sessions = field(default_factory=Sessions)
    miss_log: MissLog | None = None
    _warm_queue: deque[str] = field(default_factory=deque)
    _warm_seen: set[str] = field(default_factory=set)
    _warming: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.misses = MissIndex(self.store, int(self.settings.cache_mb * MIB * INDEX_SHARE))

    @cached_property
    def hot_headers(self) -> tuple[str, ...]:
        """Request headers that can change how an identical body is answered."""
        return ("x-replay-cassette", "x-replay-session", "x-replay-fingerprint", "content-type",
                *sorted(self.settings.key_policy.matched_headers))

    def set_override(self, cassette: str, options: CassetteOptions) -> None:
        self.overrides[cassette] = options
        self.forget_hot()

    @cached_property
    def _budget(self) -> int:
        return self.settings.cache_mb * MIB

    def remember_hot(self, hot_key: HotKey, reply: HotReply) -> None:
        """Keep a reply for its byte-identical request, within its share of --cache-mb; the
        oldest go first (a hit does not reorder: it stays one dictionary look-up)."""
        body = hot_key[2]
        size = 256 + (len(body) if isinstance(body, bytes) else 0) + recording_size(reply.recording)
        budget = int(self._budget * HOT_SHARE)
        if size > budget:
            return
        previous = self.hot.pop(hot_key, None)
        if previous is not None:
            self._hot_bytes -= previous.size
        while self.hot and self._hot_bytes + size > budget:
            self._hot_bytes -= self.hot.pop(next(iter(self.hot))).size
        self.hot[hot_key] = replace(reply, size=size)
        self._hot_bytes += size

    def forget_hot(self) -> None:
        self.hot.clear()
        self._hot_bytes = 0

    def used(self, cassette: str, key: str) -> None:
        if self.usage is not None:
            self.usage.note(cassette, key)

    def counts_for(self, cassette: str) -> Counter[CounterName]:
        counts = self.by_cassette.get(cassette)
        if counts is None:
            if len(self.by_cassette) >= self.counted_cassettes:
                self._retire_oldest()
            counts = self.by_cassette[cassette] = Counter()
        return counts

    def _retire_oldest(self) -> None:
        oldest = next(iter(self.by_cassette))
        self.retired.update(self.by_cassette.pop(oldest))
        self.retired_cassettes += 1
        self.last_miss.pop(oldest, None)
        self.forget_hot()  # hot replies hold their cassette's counter: count anew

    def count(self, cassette: str, event: CounterName, amount: int = 1) -> None:
        self.counts_for(cassette)[event] += amount
        session = COUNTING.get()
        if session is not None:
            session.counts[event] += amount

    def note_miss(self, cassette: str, session: str, record: SessionRecord | None,
                  message: str) -> None:
        """A miss answered: kept for its cassette and session, and written to the miss log."""
        self.last_miss[cassette] = message
        if record is not None:
            self.sessions.note_miss(record, message)
        if self.miss_log is not None:
            self.miss_log.write(session, cassette, message)

    def note_failure(self, cassette: str, session: str, status: int, message: str) -> None:
        """An error of the proxy's own answered (the upstream out of reach, a corrupt cassette,
        a failing hook): counted (`errors`) for its cassette and session, and written to the
        miss log, so that a test runner fails the test even when the code under test caught
        the error."""
        self.count(cassette, "errors")
        if self.miss_log is not None:
            self.miss_log.write(session, cassette, f"replay-proxy answered {status}: {message}",
                                kind="error")

    @property
    def totals(self) -> Counter[CounterName]:
        summed: Counter[CounterName] = Counter(self.retired)
        for counts in self.by_cassette.values():
            summed.update(counts)
        return summed

    def mode_for(self, cassette: str, session: SessionRecord | None = None) -> Mode:
        if session is not None and session.mode is not None:
            return session.mode
        override = self.overrides.get(cassette)
        return override.mode if override and override.mode else self.mode

    def fingerprint_for(self, cassette: str, requested: FingerprintChoice | None,
                        session: SessionRecord | None = None) -> FingerprintChoice:
        if requested:
            return requested
        if session is not None and session.fingerprint:
            return session.fingerprint
        override = self.overrides.get(cassette)
        return override.fingerprint if override and override.fingerprint else self.settings.fingerprint

    async def entry(self, cassette: str, key: str, label: str) -> Entry | None:
        cached = self._entries.get((cassette, key))
        if cached is not None:
            return cached[0]
        entry = await self.store.get(cassette, key, label)
        if entry is not None:
            self.remember(cassette, entry, changed=False)
        return entry

    def remember(self, cassette: str, entry: Entry, changed: bool = True) -> None:
        """Cache an entry read or recorded, within its share of --cache-mb; oldest go first."""
        if changed:
            self.forget_hot()  # a key gained a recording or a pin: resolve hits afresh
            self.misses.add(cassette, entry)
        name = (cassette, entry.key)
        previous = self._entries.pop(name, None)
        if previous is not None:
            self._entries_bytes -= previous[1]
        size = entry_size(entry)
        budget = int(self._budget * ENTRIES_SHARE)
        if size > budget:
            return  # served from the store each time rather than crowding out the rest
        while self._entries and self._entries_bytes + size > budget:
            self._entries_bytes -= self._entries.pop(next(iter(self._entries)))[1]
        self._entries[name] = (entry, size)
        self._entries_bytes += size

    def warm(self, cassettes: Iterable[str]) -> int:
        """Read these cassettes' entries into memory ahead of the requests for them (the pytest
        plugin names its suite's), on the event loop one key at a time, so that a request
        arriving meanwhile waits for one file at most. Stops at WARM_SHARE of the entries'
        memory; returns how many cassettes were queued."""
        queued = 0
        for name in cassettes:
            if name in self._warm_seen or len(self._warm_seen) >= MAX_WARM_CASSETTES:
                continue
            self._warm_seen.add(name)
            self._warm_queue.append(name)
            queued += 1
        if self._warm_queue and (self._warming is None or self._warming.done()):
            self._warming = asyncio.get_running_loop().create_task(self._warm_queued())
        return queued

    async def _warm_queued(self) -> None:
        room = self._warm_room
        while self._warm_queue:
            cassette = self._warm_queue.popleft()
            for entry_name in await self._names(cassette):
                await asyncio.sleep(0)  # whatever arrived meanwhile goes first
                if self._entries_bytes >= room:
                    self._warm_queue.clear()
                    return
                label, key = entry_name
                # A file that cannot be read is reported to the request that asks for it.
                with contextlib.suppress(ProxyError, OSError):
                    await self.entry(cassette, key, label)

    @property
    def _warm_room(self) -> int:
        return int(self._budget * ENTRIES_SHARE * WARM_SHARE)

    async def _names(self, cassette: str) -> list[tuple[str, str]]:
        """(label, key) of a cassette's entries, without reading them where the store allows."""
        store = self.store
        if isinstance(store, DirectoryStore):
            try:
                with os.scandir(store.root / cassette) as found:
                    stems = [item.name[:-5] for item in found
                             if item.name.endswith(".json") and not item.name.startswith(".")]
            except (OSError, ValueError):
                return []
            names = [stem.rpartition("-") for stem in sorted(stems)]
            return [(label, key) for label, _, key in names if is_key(key) and is_label(label)]
        if isinstance(store, DiskcacheStore):
            return []  # its listing reads every entry, off the loop only: not worth it here
        with contextlib.suppress(ProxyError):
            for item in await store.items(cassette):
                if item.entry is not None and self._entries_bytes < self._warm_room:
                    self.remember(cassette, item.entry, changed=False)
        return []

    async def stop_warming(self) -> None:
        self._warm_queue.clear()
        if self._warming is not None:
            self._warming.cancel()
            await asyncio.gather(self._warming, return_exceptions=True)

    def memory(self) -> dict[str, int]:
        """What the caches hold, in estimated bytes and items, for /_replay/stats."""
        return {"budget_bytes": self._budget, "entries": len(self._entries),
                "entries_bytes": self._entries_bytes, "hot_replies": len(self.hot),
                "hot_bytes": self._hot_bytes, **self.misses.memory()}

    def snapshot(self) -> dict[str, Any]:
        return {
            "run": self.usage.run if self.usage else None,
            "mode": self.mode.value,
            "store": self.store.description,
            "totals": dict(self.totals),
            "cassettes": {name: dict(counts) for name, counts in self.by_cassette.items()},
            "retired_cassettes": self.retired_cassettes,
        }
