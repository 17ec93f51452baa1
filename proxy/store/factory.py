"""Turn a `--store` value into a backend."""

from __future__ import annotations

from pathlib import Path

from .base import Store
from .redis_url import SCHEMES as REDIS_SCHEMES
from .redis_url import redacted


def open_store(spec: str | Path) -> Store:
    """`./cassettes` (a directory), `diskcache:PATH`, or Redis: `redis://host:port/db`,
    `rediss://...` (TLS), `redis+cluster://host:port/` (a Redis Cluster), `unix://PATH`."""
    text = str(spec)
    if text.startswith("diskcache:"):
        from .diskcache_store import DiskcacheStore

        return DiskcacheStore(Path(text[len("diskcache:"):]))
    if text.startswith(REDIS_SCHEMES):
        from .redis_store import RedisStore

        return RedisStore(text)
    if text.startswith("dir:"):
        text = text[len("dir:"):]
    from .directory import DirectoryStore

    return DirectoryStore(Path(text))


def describe_store(spec: str | Path) -> str:
    """A `--store` value as it may be shown (logs, messages, files): never a password."""
    return redacted(str(spec))
