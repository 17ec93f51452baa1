"""The store Protocol every backend speaks, and how a listed key is reported."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from ..core.cassette import Entry, decode_entry
from ..core.errors import CassetteError


@dataclass(frozen=True)
class StoredItem:
    """One key of one cassette as listed by a store: the entry, or why it cannot be read."""

    cassette: str
    label: str
    key: str
    entry: Entry | None
    error: CassetteError | None = None
    size: int = 0


def stored_item(cassette: str, label: str, key: str, raw: bytes, source: str) -> StoredItem:
    """A listed key: its decoded entry, or the error that says why it cannot be read."""
    try:
        entry = decode_entry(raw, source)
    except CassetteError as exc:
        return StoredItem(cassette, label, key, None, exc, len(raw))
    return StoredItem(cassette, entry.label, entry.key, entry, None, len(raw))


class Store(Protocol):
    """Entries by (cassette, key). `label` is the readable route prefix used in names."""

    description: str

    async def get(self, cassette: str, key: str, label: str) -> Entry | None: ...

    async def put(self, cassette: str, entry: Entry) -> None: ...

    async def delete(self, cassette: str, key: str, label: str) -> bool: ...

    async def cassettes(self) -> list[str]: ...

    async def items(self, cassette: str) -> Sequence[StoredItem]: ...

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        """Held while one process records a key, so others sharing the store wait for it."""
        ...

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        """The next occurrence (1, 2, ...) of a sequenced key in a session, counted where every
        process sharing the store sees it."""
        ...

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        """Give back the latest claim of a request whose answer was not stored."""
        ...

    async def reset_session(self, session: str) -> None:
        """Forget a session's counters: its next request of any key is the first again."""
        ...

    async def close(self) -> None: ...
