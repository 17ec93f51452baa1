"""The nearest recordings of a replay miss, found without scanning the cassette each time.

A miss names the recorded request nearest to the one that missed. Comparing it with every
recording of a large cassette took seconds and stalled the event loop, so each cassette gets
an index, built once off the loop: its recordings by bucket (provider, method, route,
deployment, model) with, for each field value, the recordings that have it. A miss counts the
field values it shares with each recording of its bucket, a few C-level passes yielding to the
loop between fields, and reads only the best few entries for the exact comparison.

An index lives while it fits its share of --cache-mb (the latest one is always kept), takes
the keys this process records, and is rebuilt in the background once it is a minute old, as
other processes may have recorded meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import heapq
import logging
import time
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..core.canonical import CanonicalRequest
from ..core.cassette import Entry
from ..core.errors import CassetteError
from ..core.explain import Bucket, bucket, features
from ..store import Store, StoredItem
from ..store.directory import DirectoryStore
from ..store.diskcache_store import DiskcacheStore

log = logging.getLogger("replay_proxy")

CANDIDATES = 8  # entries read and compared exactly for each miss
STALE_AFTER_S = 60.0
FIRST_BUILD_WAIT_S = 5.0  # how long a miss waits for its cassette's first index
# Stores whose coroutines read local files without ever awaiting: listed in a thread instead.
_BLOCKING_STORES = (DirectoryStore, DiskcacheStore)

# label, key, canonical request, the matching rules it was keyed under
Candidate = tuple[str, str, CanonicalRequest, Mapping[str, list[str]] | None]


@dataclass
class _Bucket:
    names: list[tuple[str, str]] = field(default_factory=list)  # (label, key) by member id
    lengths: array[int] = field(default_factory=lambda: array("i"))  # features per member
    postings: dict[int, array[int]] = field(default_factory=dict)  # feature -> member ids

    def add(self, label: str, key: str, found: tuple[int, ...]) -> None:
        member = len(self.names)
        self.names.append((label, key))
        self.lengths.append(len(found))
        for feature in set(found):
            posting = self.postings.get(feature)
            if posting is None:
                posting = self.postings[feature] = array("i")
            posting.append(member)


@dataclass
class CassetteIndex:
    built_at: float
    buckets: dict[Bucket, _Bucket] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    size: int = 0  # estimated bytes

    def add(self, label: str, key: str, request: CanonicalRequest) -> None:
        if key in self.keys:
            return
        found = features(request)
        self.keys.add(key)
        self.buckets.setdefault(bucket(request), _Bucket()).add(label, key, found)
        self.size += 200 + 12 * len(found)

    async def nearest(self, request: CanonicalRequest,
                      limit: int = CANDIDATES) -> list[tuple[str, str]]:
        """The (label, key) of at most `limit` recordings that share the most fields with
        `request`, best first."""
        home = self.buckets.get(bucket(request))
        if home is None:
            return self._elsewhere(request, limit)
        shared: Counter[int] = Counter()
        members = len(home.names)
        for feature in features(request):
            posting = home.postings.get(feature)
            if posting is None or len(posting) == members:
                continue  # nobody, or everybody, has it: it ranks no one above another
            shared.update(posting)  # counted in C
            await asyncio.sleep(0)  # a large bucket: let other requests through meanwhile
        lengths = home.lengths
        # Fewest differing fields first: a member's own fields plus the request's, less twice
        # the ones they share (the request's own count is the same for every member).
        best = heapq.nsmallest(limit, shared.items(),
                               key=lambda item: lengths[item[0]] - 2 * item[1])
        chosen = [member for member, _ in best]
        if len(chosen) < limit:  # too few share anything: any member will do
            taken = set(chosen)
            chosen += [member for member in range(min(members, limit + len(taken)))
                       if member not in taken][: limit - len(chosen)]
        return [home.names[member] for member in chosen]

    def _elsewhere(self, request: CanonicalRequest, limit: int) -> list[tuple[str, str]]:
        """No recording in the request's bucket: a few from the closest buckets (same route,
        then same provider), to show what differs."""
        provider, method, route, _, _ = bucket(request)

        def closeness(name: Bucket) -> tuple[bool, bool, bool]:
            return (name[2] != route, name[1] != method, name[0] != provider)

        chosen: list[tuple[str, str]] = []
        for name in sorted(self.buckets, key=closeness):
            chosen += self.buckets[name].names[: limit - len(chosen)]
            if len(chosen) >= limit:
                break
        return chosen


def _index(items: Sequence[StoredItem]) -> CassetteIndex:
    index = CassetteIndex(built_at=time.monotonic())
    for item in items:
        if item.entry is not None:
            index.add(item.entry.label, item.entry.key, item.entry.request)
    return index


def _list_and_index(store: Store, cassette: str) -> CassetteIndex:
    """In a worker thread: the store's listing (its coroutine never awaits) and the index."""
    return _without_gc(lambda: _index(asyncio.run(_items(store, cassette))))


def _without_gc(build: Callable[[], CassetteIndex]) -> CassetteIndex:
    """Listing a large cassette makes many objects, none in a cycle, and the collector's full
    passes over them stop every thread, the event loop's included, for 100-200 ms each.
    (Process-wide: a concurrent build may turn it back on early, which only costs pauses.)"""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return build()
    finally:
        if collecting:
            gc.enable()
        _give_back_memory()


def _give_back_memory() -> None:
    """The listing's memory, freed, stays in the worker thread's malloc arena unless it is
    trimmed: with glibc, hand it back to the system (elsewhere there is nothing to do)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


async def _items(store: Store, cassette: str) -> Sequence[StoredItem]:
    return await store.items(cassette)


def _report(task: asyncio.Task[CassetteIndex]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not index a cassette to explain misses: %s", task.exception())


class MissIndex:
    """The cassette indexes of one proxy process."""

    def __init__(self, store: Store, budget: int) -> None:
        self._store = store
        self._budget = budget
        self._indexes: dict[str, CassetteIndex] = {}  # oldest first
        self._building: dict[str, asyncio.Task[CassetteIndex]] = {}

    async def candidates(self, cassette: str,
                         request: CanonicalRequest) -> list[Candidate] | None:
        """The nearest recordings of `cassette` to `request`, read from the store, or None
        while the cassette's first index is still being built."""
        index = self._indexes.get(cassette)
        if index is None:
            try:
                index = await asyncio.wait_for(asyncio.shield(self._build(cassette)),
                                               FIRST_BUILD_WAIT_S)
            except TimeoutError:
                return None
        elif time.monotonic() - index.built_at > STALE_AFTER_S:
            self._build(cassette)  # in the background; this miss uses the index it has
        names = await index.nearest(request)
        entries = await self._read(cassette, names)
        return [(entry.label, entry.key, entry.request, entry.rules) for entry in entries]

    def add(self, cassette: str, entry: Entry) -> None:
        """A key this process recorded joins its cassette's index, if it has one."""
        index = self._indexes.get(cassette)
        if index is not None:
            before = index.size
            index.add(entry.label, entry.key, entry.request)
            if index.size != before:
                self._fit()

    def _build(self, cassette: str) -> asyncio.Task[CassetteIndex]:
        task = self._building.get(cassette)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._make(cassette))
            task.add_done_callback(_report)
            self._building[cassette] = task
        return task

    async def _make(self, cassette: str) -> CassetteIndex:
        try:
            if isinstance(self._store, _BLOCKING_STORES):
                index = await asyncio.to_thread(_list_and_index, self._store, cassette)
            else:  # an asynchronous store lists without blocking; indexing is CPU work
                items = await self._store.items(cassette)
                index = await asyncio.to_thread(_without_gc, lambda: _index(items))
                del items
        finally:
            del self._building[cassette]
        self._indexes.pop(cassette, None)
        self._indexes[cassette] = index
        self._fit()
        return index

    def _fit(self) -> None:
        """Drop the oldest indexes past the budget; the latest is kept whatever its size."""
        total = sum(index.size for index in self._indexes.values())
        while len(self._indexes) > 1 and total > self._budget:
            oldest = next(iter(self._indexes))
            total -= self._indexes.pop(oldest).size

    async def _read(self, cassette: str, names: list[tuple[str, str]]) -> list[Entry]:
        async def read_all() -> list[Entry | None]:
            found = []
            for label, key in names:
                try:
                    found.append(await self._store.get(cassette, key, label))
                except CassetteError:
                    continue  # a bad file is reported when its own key is asked for
            return found

        if isinstance(self._store, _BLOCKING_STORES):
            found = await asyncio.to_thread(asyncio.run, read_all())
        else:
            found = await read_all()
        return [entry for entry in found if entry is not None]  # one may have been pruned

    async def close(self) -> None:
        tasks = list(self._building.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def memory(self) -> dict[str, int]:
        return {"miss_indexes": len(self._indexes),
                "miss_index_bytes": sum(index.size for index in self._indexes.values())}
