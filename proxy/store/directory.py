"""Cassettes as folders of JSON files: the format users commit and review.

`<root>/<cassette>/<label>-<key>.json`, one file per key. Writes go to a temporary file in the
same folder and are renamed into place, so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from ..cassette import Entry, decode_entry, encode_entry
from ..usage import STATE_DIR
from .base import StoredItem, stored_item
from .locking import StripedLocks


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"
        self._folders: set[Path] = set()
        self._locks = StripedLocks(root / STATE_DIR / "locks")

    def path_for(self, cassette: str, key: str, label: str) -> Path:
        return self.root / cassette / f"{label}-{key}.json"

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        path = self.path_for(cassette, key, label)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return decode_entry(raw, str(path))

    async def put(self, cassette: str, entry: Entry) -> None:
        path = self.path_for(cassette, entry.key, entry.label)
        if path.parent not in self._folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(path.parent)
        # Creating a file costs far more than a request on some disks: write in a thread so
        # the event loop keeps serving meanwhile.
        await asyncio.to_thread(_write_atomically, path, encode_entry(entry))

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        try:
            self.path_for(cassette, key, label).unlink()
        except FileNotFoundError:
            return False
        return True

    async def cassettes(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = set()
        for path in self.root.rglob("*.json"):
            relative = path.parent.relative_to(self.root)
            if path.name.startswith(".") or any(p.startswith(".") for p in relative.parts):
                continue
            if relative.parts:
                names.add(relative.as_posix())
        return sorted(names)

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        folder = self.root / cassette
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("."):
                continue
            label, _, key = path.stem.rpartition("-")
            found.append(stored_item(cassette, label, key, path.read_bytes(), str(path)))
        return found

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(cassette, key)

    async def close(self) -> None:
        self._locks.close()
