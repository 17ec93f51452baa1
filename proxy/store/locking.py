"""Cross-process locks on one key, so that several proxy processes sharing a store make one
upstream call per key. A lock is a file held with flock; it dies with its process."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def file_lock(folder: Path, cassette: str, key: str,
                    timeout: float = 900.0) -> AsyncIterator[None]:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(cassette.encode()).hexdigest()[:12]
    path = folder / f"{tag}-{key}.lock"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.002
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            if loop.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for another process recording "
                                   f"{cassette}/{key[:16]}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        # The holder before us unlinks the file when done; a lock on an unlinked file is void.
        try:
            same = os.fstat(handle).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(handle)
