"""Turn a `--store` value into a backend."""

from __future__ import annotations

import re
from pathlib import Path

from .base import Store
from .redis_url import SCHEMES as REDIS_SCHEMES
from .redis_url import redacted

# `name:` or `name://` at the start of a value: a kind of store, not a folder. Two letters at
# least, so that a Windows drive (`C:\cassettes`) is still a folder.
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_LOCAL_KINDS = ("diskcache:", "dir:")


def open_store(spec: str | Path) -> Store:
    """`./cassettes` (a directory), `diskcache:PATH`, or Redis: `redis://host:port/db`,
    `rediss://...` (TLS), `redis+cluster://host:port/` (a Redis Cluster), `unix://PATH`.
    Raises ValueError for a value that names a kind of store this version does not know."""
    text = str(spec)
    if text.startswith("diskcache:"):
        from .diskcache_store import DiskcacheStore

        return DiskcacheStore(Path(text[len("diskcache:"):]))
    if text.startswith(REDIS_SCHEMES):
        from .redis_store import RedisStore

        return RedisStore(text)
    from .directory import DirectoryStore

    folder = store_folder(text)
    assert folder is not None  # (Redis is handled above)
    return DirectoryStore(folder)


def store_folder(spec: str | Path) -> Path | None:
    """The folder a local store (a directory, diskcache:PATH) keeps its entries in; None for
    Redis. Raises ValueError for an unknown kind of store (a typo such as `diskcahce:` would
    otherwise be taken for the name of a folder, and quietly hold nothing)."""
    if isinstance(spec, Path):
        return spec
    if spec.startswith(REDIS_SCHEMES):
        return None
    for kind in _LOCAL_KINDS:
        if spec.startswith(kind):
            return Path(spec[len(kind):])
    unknown = _KIND.match(spec)
    if unknown is not None:
        raise ValueError(
            f"Unknown kind of store {unknown.group(0)!r} in {redacted(spec)!r}: a store is a folder "
            f"(or dir:PATH), diskcache:PATH, or a Redis URL ({', '.join(REDIS_SCHEMES)}). A "
            "folder whose name holds a colon is written ./NAME or dir:NAME.")
    return Path(spec)


def describe_store(spec: str | Path) -> str:
    """A `--store` value as it may be shown (logs, messages, files): never a password."""
    return redacted(str(spec))
