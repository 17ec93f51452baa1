"""What a running proxy holds: settings, store, in-flight calls, recent entries and counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import orjson

from ..core.cassette import Entry, Recording
from ..core.modes import Mode
from ..core.settings import Settings
from ..store import Store
from .flights import SingleFlight
from .misses import MissIndex
from .upstream import Upstream
from .usage import UsageLog, new_run_id

MIB = 1024 * 1024
# Shares of --cache-mb: entries read or recorded, replies to byte-identical requests (their
# keys hold request bodies), and the miss indexes (see `misses`).
ENTRIES_SHARE, HOT_SHARE, INDEX_SHARE = 0.4, 0.4, 0.2
# Cassettes whose counters are kept one by one; older ones are folded into `retired`, so the
# totals stay whole however many cassette names clients make up.
COUNTED_CASSETTES = 4096


@dataclass(frozen=True)
class CassetteOptions:
    """Per-cassette overrides, set by the pytest plugin for one test."""

    mode: Mode | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class HotReply:
    """A hit resolved once, replayed again for the byte-identical request without re-keying."""

    cassette: str
    key: str
    recording: Recording
    headers: dict[str, str]
    tokens: int
    counts: Counter[str]  # the cassette's counters, so a hit counts itself without lookups
    size: int = 0  # bytes it holds, with its key: set by remember_hot


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
    by_cassette: dict[str, Counter[str]] = field(default_factory=dict)
    usage: UsageLog | None = None
    last_miss: dict[str, str] = field(default_factory=dict)
    hot: dict[HotKey, HotReply] = field(default_factory=dict)
    # Counts of cassettes whose counters were let go (COUNTED_CASSETTES), part of the totals.
    retired: Counter[str] = field(default_factory=Counter)
    retired_cassettes: int = 0
    counted_cassettes: int = COUNTED_CASSETTES
    _hot_bytes: int = 0
    _entries: dict[tuple[str, str], tuple[Entry, int]] = field(default_factory=dict)
    _entries_bytes: int = 0
    misses: MissIndex = field(init=False)

    def __post_init__(self) -> None:
        self.misses = MissIndex(self.store, int(self.settings.cache_mb * MIB * INDEX_SHARE))

    @cached_property
    def hot_headers(self) -> tuple[str, ...]:
        """Request headers that can change how an identical body is answered."""
        return ("x-replay-cassette", "x-replay-fingerprint", "content-type",
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

    def counts_for(self, cassette: str) -> Counter[str]:
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

    def count(self, cassette: str, event: str, amount: int = 1) -> None:
        self.counts_for(cassette)[event] += amount

    @property
    def totals(self) -> Counter[str]:
        summed: Counter[str] = Counter(self.retired)
        for counts in self.by_cassette.values():
            summed.update(counts)
        return summed

    def mode_for(self, cassette: str) -> Mode:
        override = self.overrides.get(cassette)
        return override.mode if override and override.mode else self.mode

    def fingerprint_for(self, cassette: str, requested: str | None) -> str:
        if requested:
            return requested
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
