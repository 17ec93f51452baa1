"""Sequence counters of the local stores: how many identical requests each session has made to
each sequenced key, shared by every process on the machine that uses the store.

`serve --workers N` spreads one client's requests over N processes, so the n-th poll of a batch
must be counted in one place. The counters live in a small diskcache (SQLite, whose
transactions are atomic across processes) beside the store, rather than in hand-written lock
files; one claim costs about 70 µs, little enough to stay on the event loop. A counter expires a
day after its session last used it. Where the folder cannot be written (a read-only checkout
replaying in CI), counting falls back to this process's memory, with one warning.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import diskcache

from ..core.errors import CassetteError
from .diskcache_disk import NoPickleDisk
from .state_dir import STATE_DIR, ensure_state_dir

log = logging.getLogger("replay_proxy")

SESSION_TTL_S = 24 * 3600
_SEPARATOR = "\x1f"


class LocalSequences:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: Any = None
        self._memory: Counter[str] | None = None  # set when the folder cannot be used

    def _counters(self) -> Any:
        if self._cache is None and self._memory is None:
            try:
                if self.folder.parent.name == STATE_DIR:
                    ensure_state_dir(self.folder.parent)
                self._cache = diskcache.Cache(str(self.folder), disk=NoPickleDisk, tag_index=True,
                                              eviction_policy="least-recently-stored")
            except (OSError, sqlite3.Error) as exc:
                log.warning("sequence counters cannot be kept in %s (%s); counting in this "
                            "process only, so --workers will not share them", self.folder, exc)
                self._memory = Counter()
        return self._cache

    async def claim(self, session: str, cassette: str, key: str) -> int:
        """The next occurrence (1, 2, ...) of `key` in `session`."""
        name = _SEPARATOR.join((session, cassette, key))
        cache = self._counters()
        if cache is None:
            assert self._memory is not None
            self._memory[name] += 1
            return self._memory[name]
        with cache.transact():
            value = self._count(cache.get(name, 0)) + 1
            cache.set(name, value, expire=SESSION_TTL_S, tag=session)
        return value

    async def release(self, session: str, cassette: str, key: str) -> None:
        """Give back the latest claim: its answer did not become part of the sequence."""
        name = _SEPARATOR.join((session, cassette, key))
        cache = self._counters()
        if cache is None:
            assert self._memory is not None
            self._memory[name] = max(0, self._memory[name] - 1)
            return
        with cache.transact():
            value = self._count(cache.get(name, 0))
            if value > 0:
                cache.set(name, value - 1, expire=SESSION_TTL_S, tag=session)

    def _count(self, value: object) -> int:
        """A stored counter. The folder is the proxy's own, but it sits beside the cassettes:
        what it holds is checked like anything else read back (NoPickleDisk has already refused
        pickles and files it did not make)."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise CassetteError(
            f"A sequence counter in {self.folder} holds a {type(value).__name__} that is no "
            "count, which replay-proxy never writes. Delete that folder: it holds only "
            "counters, which start again from the first request of each session."
        )

    async def reset(self, session: str) -> None:
        cache = self._counters()
        if cache is None:
            assert self._memory is not None
            prefix = session + _SEPARATOR
            for name in [name for name in self._memory if name.startswith(prefix)]:
                del self._memory[name]
            return
        cache.evict(session)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
