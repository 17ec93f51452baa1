"""Cassettes as folders of JSON files: the format users commit and review.

`<root>/<cassette>/<label>-<key>.json`, one file per key. Writes go to a temporary file in the
same folder and are renamed into place, so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from ..core.cassette import Entry, decode_entry, encode_entry
from .base import StoredItem, stored_item
from .locking import StripedLocks
from .sequences import LocalSequences
from .state_dir import STATE_DIR

SLOW_WRITE_S = 0.005


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"
        self._folders: set[Path] = set()
        self._sequences = LocalSequences(root / STATE_DIR / "sequences")
        self._locks = StripedLocks(root / STATE_DIR / "locks")
        self._write_cost = 0.0  # seconds: a moving average of the writes made on the loop

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
        data = encode_entry(entry)
        if self._write_cost > SLOW_WRITE_S:
            await asyncio.to_thread(_write_atomically, path, data)
            return
        # The clients already have their answers. A local write costs less than handing it to a
        # thread (whose wake-ups and GIL hand-overs slow the next request); on a slow disk or
        # network file system, writes move to a thread so that the event loop keeps serving.
        started = time.perf_counter()
        _write_atomically(path, data)
        self._write_cost += (time.perf_counter() - started - self._write_cost) * 0.2

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

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        return await self._sequences.claim(session, cassette, key)

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        await self._sequences.release(session, cassette, key)

    async def reset_session(self, session: str) -> None:
        await self._sequences.reset(session)

    async def close(self) -> None:
        self._sequences.close()
        self._locks.close()
