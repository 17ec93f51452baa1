"""Entries in a diskcache (SQLite-backed) cache: a fast local store outside the repository."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import diskcache

from ..core.cassette import Entry, encode_entry
from .base import StoredItem, checked_entry, stored_item, writable_name
from .diskcache_disk import NoPickleDisk
from .locking import StripedLocks
from .sequences import LocalSequences

_SEPARATOR = "\x1f"


class DiskcacheStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"diskcache:{path}"
        self._cache = diskcache.Cache(str(path), disk=NoPickleDisk)
        self._sequences = LocalSequences(path / "sequences")
        self._locks = StripedLocks(path / "locks")

    def _name(self, cassette: str, key: str) -> str:
        return f"{cassette}{_SEPARATOR}{key}"

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        raw = self._cache.get(self._name(cassette, key))
        if raw is None:
            return None
        return checked_entry(bytes(raw), f"{self.description} [{cassette}/{label}-{key}]", key)

    async def put(self, cassette: str, entry: Entry) -> None:
        writable_name(cassette, entry.key, entry.label)
        self._cache.set(self._name(cassette, entry.key), encode_entry(entry))

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        return bool(self._cache.delete(self._name(cassette, key)))

    async def cassettes(self) -> list[str]:
        names = {str(name).split(_SEPARATOR)[0] for name in self._cache.iterkeys()}
        return sorted(names)

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        prefix = cassette + _SEPARATOR
        found = []
        for name in sorted(str(n) for n in self._cache.iterkeys()):
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):]
            raw = self._cache.get(name)
            if raw is None:
                continue
            found.append(stored_item(cassette, "", key, bytes(raw),
                                     f"{self.description} [{cassette}/{key}]"))
        return found

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(cassette, key)

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        return await self._sequences.claim(session, cassette, key)

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        await self._sequences.release(session, cassette, key)

    async def reset_session(self, session: str) -> None:
        await self._sequences.reset(session)

    async def close(self) -> None:
        self._sequences.close()
        self._locks.close()
        self._cache.close()
