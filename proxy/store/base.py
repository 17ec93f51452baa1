"""The store Protocol every backend speaks, and how a listed key is reported."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from ..core.cassette import Entry, decode_entry, is_key, is_label
from ..core.errors import CassetteError, ProxyError
from ..core.providers import validate_cassette_name

# The cassette of rows a store cannot attribute to any cassette (a diskcache row whose key is a
# pickle, say): no valid cassette name looks like it, so it never meets a real one.
UNATTRIBUTED = "(unattributed)"


@dataclass(frozen=True)
class StoredItem:
    """One key of one cassette as listed by a store: the entry, or why it cannot be read."""

    cassette: str
    label: str
    key: str
    entry: Entry | None
    error: CassetteError | None = None
    size: int = 0


def checked_entry(raw: bytes, source: str, key: str, label: str | None = None) -> Entry:
    """The entry stored under `key` (and, where a store's names carry one, `label`): decoded,
    and refused unless it is the entry of the place it was found at. A store builds paths
    from names it checked, never from what a file says, so a file claiming another key (or a
    key like `/../x`) would otherwise be written back elsewhere by refresh or `pin`."""
    entry = decode_entry(raw, source)
    if entry.key != key or (label is not None and entry.label != label):
        claimed = f"{entry.label}-{entry.key}" if label is not None else entry.key
        where = f"{label}-{key}" if label is not None else key
        raise CassetteError(
            f"Cassette file {source} says it holds {claimed[:90]!r} but is stored as "
            f"{where[:90]!r}: it was copied or edited by hand. Restore it from version control, "
            "or delete it to record again; other recordings are unaffected."
        )
    return entry


def stored_item(cassette: str, label: str, key: str, raw: bytes, source: str) -> StoredItem:
    """A listed key: its checked entry, or the error that says why it cannot be used. `label`
    is the one in the stored name, or "" where a store's names carry none."""
    try:
        validate_cassette_name(cassette)
    except ProxyError as exc:
        return StoredItem(cassette, label, key, None, CassetteError(
            f"{source}: {exc.message} Nothing stored under it is used."), len(raw))
    try:
        entry = checked_entry(raw, source, key, label or None)
    except CassetteError as exc:
        return StoredItem(cassette, label, key, None, exc, len(raw))
    return StoredItem(cassette, entry.label, entry.key, entry, None, len(raw))


def writable_name(cassette: str, entry_key: str, label: str) -> None:
    """Refuse to store under a name a store would not have made: a cassette name that is not
    one, a key that is not 64 hex digits, a label that is not file-name safe."""
    validate_cassette_name(cassette)
    if not is_key(entry_key) or not is_label(label):
        raise CassetteError(
            f"Refusing to store key {entry_key[:80]!r} with label {label[:80]!r} in cassette "
            f"{cassette!r}: a key is 64 lowercase hex digits and a label a file-name-safe route "
            "name. This entry did not come from replay-proxy."
        )


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
