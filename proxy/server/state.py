"""What a running proxy holds: settings, store, in-flight calls, recent entries and counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..core.cassette import Entry, Recording
from ..core.modes import Mode
from ..core.settings import Settings
from ..store import Store
from .flights import SingleFlight
from .upstream import Upstream
from .usage import UsageLog, new_run_id

_CACHE_LIMIT = 4096  # entries kept in memory; a bound on RSS, not on the store
_HOT_LIMIT = 8192


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
    _entries: dict[tuple[str, str], Entry] = field(default_factory=dict)

    @cached_property
    def hot_headers(self) -> tuple[str, ...]:
        """Request headers that can change how an identical body is answered."""
        return ("x-replay-cassette", "x-replay-fingerprint", "content-type",
                *sorted(self.settings.key_policy.matched_headers))

    def set_override(self, cassette: str, options: CassetteOptions) -> None:
        self.overrides[cassette] = options
        self.hot.clear()

    def remember_hot(self, hot_key: HotKey, reply: HotReply) -> None:
        if len(self.hot) >= _HOT_LIMIT:
            self.hot.pop(next(iter(self.hot)))
        self.hot[hot_key] = reply

    def used(self, cassette: str, key: str) -> None:
        if self.usage is not None:
            self.usage.note(cassette, key)

    def counts_for(self, cassette: str) -> Counter[str]:
        counts = self.by_cassette.get(cassette)
        if counts is None:
            counts = self.by_cassette[cassette] = Counter()
        return counts

    def count(self, cassette: str, event: str, amount: int = 1) -> None:
        self.counts_for(cassette)[event] += amount

    @property
    def totals(self) -> Counter[str]:
        summed: Counter[str] = Counter()
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
            return cached
        entry = await self.store.get(cassette, key, label)
        if entry is not None:
            self.remember(cassette, entry)
        return entry

    def remember(self, cassette: str, entry: Entry) -> None:
        self.hot.clear()  # a key gained a recording or a pin: resolve hits afresh
        if len(self._entries) >= _CACHE_LIMIT:
            self._entries.pop(next(iter(self._entries)))
        self._entries[(cassette, entry.key)] = entry

    def snapshot(self) -> dict[str, Any]:
        return {
            "run": self.usage.run if self.usage else None,
            "mode": self.mode.value,
            "store": self.store.description,
            "totals": dict(self.totals),
            "cassettes": {name: dict(counts) for name, counts in self.by_cassette.items()},
        }
