"""Turn a `--store` value into a backend."""

from __future__ import annotations

from pathlib import Path

from .base import Store


def open_store(spec: str | Path) -> Store:
    """`./cassettes` (a directory), `diskcache:PATH` or `redis://host:port/db`."""
    text = str(spec)
    if text.startswith("diskcache:"):
        from .diskcache_store import DiskcacheStore

        return DiskcacheStore(Path(text[len("diskcache:"):]))
    if text.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(text)
    if text.startswith("dir:"):
        text = text[len("dir:"):]
    from .directory import DirectoryStore

    return DirectoryStore(Path(text))
