"""Locks on keys across stores and processes, so that proxies sharing a store make one upstream
call per key.

Keys hash onto stripes: byte ranges of one lock file, which each store opens once, so that
taking a lock costs no file creation (which is slow on some disks). Within a store, holders of
one key queue on an asyncio lock, and holders of different keys on one stripe share the
stripe's lock, let go when the last of them leaves. A lock dies with its store's descriptor,
and so with its process.

Platforms: on Linux (kernel 3.15 or later) the byte ranges are locked with open file
description (OFD) locks, which belong to the store that took them: two stores on one folder
exclude each other whether they live in one process (several proxies in a pytest session) or
in several, and closing one store leaves the other's locks alone. Where the system has no OFD
locks (macOS, the BSDs) they fall back to POSIX record locks, which belong to the whole
process: separate processes still exclude each other, but two stores in one process do not,
and closing one of them releases the other's locks. No library locks byte ranges of one file
per open description, so this is kept here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from .state_dir import STATE_DIR, ensure_state_dir

STRIPES = 4096
PER_STORE = hasattr(fcntl, "F_OFD_SETLK")  # False: locks are per process (see above)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks); padded to 8 bytes.
_FLOCK = struct.Struct("hhqqi")
_FLOCK_PADDING = b"\0" * (-_FLOCK.size % 8)
_BUSY = (errno.EAGAIN, errno.EACCES)  # another holder has the range


def _try_lock(fd: int, stripe: int) -> bool:
    try:
        if PER_STORE:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, stripe))
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, stripe)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        raise
    return True


def _unlock(fd: int, stripe: int) -> None:
    if PER_STORE:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, stripe))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, stripe)


def _flock(kind: int, stripe: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, stripe, 1, 0) + _FLOCK_PADDING


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
                _unlock(self._file(), stripe)

    async def _acquire(self, stripe: int, timeout: float, name: str) -> None:
        fd = self._file()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while True:
            if self._holders.get(stripe, 0):  # taken in this store while we slept
                return
            if _try_lock(fd, stripe):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for another proxy recording "
                                   f"{name}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
