"""What a store kept on this machine's disk shares between the processes that open it: the
per-key locks that keep one upstream call per key, and the sequence counters of sessions."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

from .locking import StripedLocks
from .sequences import LocalSequences


class LocalCoordination:
    """The lock and counter half of the Store protocol, for the directory and diskcache stores."""

    def __init__(self, locks: Path, sequences: Path) -> None:
        self._locks = StripedLocks(locks)
        self._sequences = LocalSequences(sequences)

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(cassette, key)

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        return await self._sequences.claim(session, cassette, key)

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        await self._sequences.release(session, cassette, key)

    async def reset_session(self, session: str) -> None:
        await self._sequences.reset(session)

    def close_coordination(self) -> None:
        self._sequences.close()
        self._locks.close()
