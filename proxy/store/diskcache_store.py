"""Entries in a diskcache (SQLite-backed) cache: a fast local store outside the repository."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import diskcache

from ..core.cassette import Entry, encode_entry, is_key
from ..core.errors import CassetteError, ProxyError
from ..core.providers import validate_cassette_name
from .base import UNATTRIBUTED, StoredItem, checked_entry, stored_item, writable_name
from .diskcache_disk import NoPickleDisk, RefusedKey
from .local import LocalCoordination

_SEPARATOR = "\x1f"


def _valid_cassette(name: str) -> bool:
    try:
        validate_cassette_name(name)
    except ProxyError:
        return False
    return True


class DiskcacheStore(LocalCoordination):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"diskcache:{path}"
        self._cache = diskcache.Cache(str(path), disk=NoPickleDisk)
        super().__init__(locks=path / "locks", sequences=path / "sequences")

    def _name(self, cassette: str, key: str) -> str:
        return f"{cassette}{_SEPARATOR}{key}"

    def _source(self, cassette: str, key: str, label: str = "") -> str:
        return f"{self.description} [{cassette}/{f'{label}-' if label else ''}{key}]"

    def _raw(self, name: str, source: str) -> bytes | None:
        """The bytes stored under `name`; anything else replay-proxy never writes is refused."""
        raw = self._cache.get(name)  # NoPickleDisk refuses pickles and foreign value files
        if raw is None or isinstance(raw, bytes):
            return raw
        raise CassetteError(f"Cassette entry {source} holds a {type(raw).__name__}, not the "
                            "bytes replay-proxy writes; delete it (or the store's folder).")

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        source = self._source(cassette, key, label)
        raw = self._raw(self._name(cassette, key), source)
        if raw is None:
            return None
        return checked_entry(raw, source, key)

    async def put(self, cassette: str, entry: Entry) -> None:
        writable_name(cassette, entry.key, entry.label)
        self._cache.set(self._name(cassette, entry.key), encode_entry(entry))

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        return bool(self._cache.delete(self._name(cassette, key)))

    def _rows(self) -> tuple[dict[str, list[str]], list[StoredItem]]:
        """The keys of each cassette, and the rows no cassette can claim: a key that is a
        pickle (never loaded), or not `<cassette>\x1f<key>` with both valid."""
        keys: dict[str, list[str]] = {}
        foreign: list[StoredItem] = []
        for name in self._cache.iterkeys():
            cassette, separator, key = name.partition(_SEPARATOR) if isinstance(name, str) \
                else ("", "", "")
            if separator and is_key(key) and _valid_cassette(cassette):
                keys.setdefault(cassette, []).append(key)
                continue
            shown = str(name) if isinstance(name, RefusedKey) else repr(name)[:80]
            foreign.append(StoredItem(UNATTRIBUTED, "", shown, None, CassetteError(
                f"The diskcache store at {self.path} holds a row whose key is {shown}, which "
                "replay-proxy never writes (it was not loaded). Delete the store's folder, or "
                "export what it holds first.")))
        return keys, foreign

    async def cassettes(self) -> list[str]:
        keys, foreign = self._rows()
        return sorted(keys) + ([UNATTRIBUTED] if foreign else [])

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        keys, foreign = self._rows()
        if cassette == UNATTRIBUTED:
            return foreign
        found = []
        for key in sorted(keys.get(cassette, [])):
            source = self._source(cassette, key)
            try:
                raw = self._raw(self._name(cassette, key), source)
            except CassetteError as exc:
                found.append(StoredItem(cassette, "", key, None, exc))
                continue
            if raw is not None:
                found.append(stored_item(cassette, "", key, raw, source))
        return found

    async def close(self) -> None:
        self.close_coordination()
        self._cache.close()
