"""Cross-process locks on keys, so that several proxy processes sharing a store make one
upstream call per key.

Keys hash onto stripes: byte ranges of one lock file, opened once and locked with POSIX record
locks, so that taking a lock costs no file creation (which is slow on some disks). Record locks
belong to the process: within it, holders of one key queue on an asyncio lock, and holders of
different keys on one stripe share the stripe's lock, let go when the last of them leaves. A
lock dies with its process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from .state_dir import STATE_DIR, ensure_state_dir

STRIPES = 4096


class StripedLocks:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._holders: dict[int, int] = {}
        self._keys: dict[str, tuple[asyncio.Lock, int]] = {}

    def _file(self) -> int:
        if self._fd is None:
            if self.folder.parent.name == STATE_DIR:
                ensure_state_dir(self.folder.parent)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.folder / "stripes.lock", os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    @contextlib.asynccontextmanager
    async def hold(self, cassette: str, key: str, timeout: float = 900.0) -> AsyncIterator[None]:
        name = f"{cassette}\x1f{key}"
        key_lock, users = self._keys.get(name, (asyncio.Lock(), 0))
        self._keys[name] = (key_lock, users + 1)
        try:
            async with key_lock, self._stripe(name, timeout):
                yield
        finally:
            key_lock, users = self._keys[name]
            if users == 1:
                del self._keys[name]
            else:
                self._keys[name] = (key_lock, users - 1)

    @contextlib.asynccontextmanager
    async def _stripe(self, name: str, timeout: float) -> AsyncIterator[None]:
        digest = hashlib.sha256(name.encode()).digest()
        stripe = int.from_bytes(digest[:4], "big") % STRIPES
        if self._holders.get(stripe, 0) == 0:
            await self._acquire(stripe, timeout, name.replace("\x1f", "/")[:80])
        self._holders[stripe] = self._holders.get(stripe, 0) + 1
        try:
            yield
        finally:
            self._holders[stripe] -= 1
            if self._holders[stripe] == 0:
                fcntl.lockf(self._file(), fcntl.LOCK_UN, 1, stripe)

    async def _acquire(self, stripe: int, timeout: float, name: str) -> None:
        fd = self._file()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while True:
            if self._holders.get(stripe, 0):  # taken in this process while we slept
                return
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, stripe)
                return
            except OSError:  # EAGAIN or EACCES: another process holds the stripe
                if loop.time() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f}s for another process recording "
                                       f"{name}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
