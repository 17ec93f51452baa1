"""Entries in Redis, shared by a fleet of proxies and CI runners.

Keys: `<prefix>:{<cassette>}:e:<key>` holds the encoded entry (the same bytes as a cassette
file), `<prefix>:{<cassette>}:index` the set of the cassette's keys, `<prefix>:cassettes` the
set of cassette names. The cassette sits in braces, a Redis Cluster hash tag, so one cassette's
keys live in one slot. `redis://host:port/db?ttl=SECONDS&prefix=NAME` sets an expiry on entries
and the key prefix (default `replay`).

Sequence counters: `<prefix>:{<cassette>}:seq:<session>` is a hash of key -> occurrences claimed
(in the cassette's slot, so one command touches one slot), and `<prefix>:session:<session>` the
set of cassettes a session counted in, so a reset finds them. Both expire a day after last use.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..core.cassette import Entry, decode_entry, encode_entry
from .base import StoredItem, stored_item

try:
    from redis import asyncio as redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ValueError(
        "The Redis store needs redis-py: pip install 'replay-proxy[redis]'."
    ) from exc

# Release a lock only if it is still ours; extend it likewise.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_EXTEND = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")
# Give back a claim without going below zero.
_RELEASE_CLAIM = ("local v = redis.call('hget', KEYS[1], ARGV[1]) "
                  "if v and tonumber(v) > 0 then return redis.call('hincrby', KEYS[1], ARGV[1], -1) "
                  "end return 0")
LOCK_MS = 30_000
SESSION_TTL_S = 24 * 3600


def _split_url(url: str) -> tuple[str, int | None, str]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    ttl = int(query.pop("ttl")) if "ttl" in query else None
    prefix = query.pop("prefix", "replay")
    return urlunsplit(parts._replace(query=urlencode(query))), ttl, prefix


class RedisStore:
    def __init__(self, url: str) -> None:
        connection_url, self.ttl, self.prefix = _split_url(url)
        self.description = url
        self._client: Any = redis.Redis.from_url(connection_url)

    def _entry_key(self, cassette: str, key: str) -> str:
        return f"{self.prefix}:{{{cassette}}}:e:{key}"

    def _index_key(self, cassette: str) -> str:
        return f"{self.prefix}:{{{cassette}}}:index"

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        raw = await self._client.get(self._entry_key(cassette, key))
        if raw is None:
            return None
        return decode_entry(bytes(raw), f"{self.description} [{cassette}/{label}-{key}]")

    async def put(self, cassette: str, entry: Entry) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self._entry_key(cassette, entry.key), encode_entry(entry), ex=self.ttl)
            pipe.sadd(self._index_key(cassette), entry.key)
            pipe.sadd(f"{self.prefix}:cassettes", cassette)
            await pipe.execute()

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        removed = await self._client.delete(self._entry_key(cassette, key))
        await self._client.srem(self._index_key(cassette), key)
        return bool(removed)

    async def cassettes(self) -> list[str]:
        names = await self._client.smembers(f"{self.prefix}:cassettes")
        return sorted(name.decode() for name in names)

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        keys = sorted(key.decode() for key in await self._client.smembers(self._index_key(cassette)))
        found = []
        for key in keys:
            raw = await self._client.get(self._entry_key(cassette, key))
            if raw is None:  # expired: forget it
                await self._client.srem(self._index_key(cassette), key)
                continue
            found.append(stored_item(cassette, "", key, bytes(raw),
                                     f"{self.description} [{cassette}/{key}]"))
        return found

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        return self._lock(f"{self.prefix}:{{{cassette}}}:lock:{key}")

    @contextlib.asynccontextmanager
    async def _lock(self, name: str, timeout: float = 900.0) -> AsyncIterator[None]:
        """A lock with an expiry, renewed while held, so a crashed holder frees it."""
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while not await self._client.set(name, token, nx=True, px=LOCK_MS):
            if loop.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for the Redis lock {name}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

        async def renew() -> None:
            while True:
                await asyncio.sleep(LOCK_MS / 3000)
                await self._client.eval(_EXTEND, 1, name, token, LOCK_MS)

        renewal = loop.create_task(renew())
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            await self._client.eval(_RELEASE, 1, name, token)

    def _sequence_key(self, session: str, cassette: str) -> str:
        return f"{self.prefix}:{{{cassette}}}:seq:{session}"

    def _session_key(self, session: str) -> str:
        return f"{self.prefix}:session:{session}"

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        counters, cassettes = self._sequence_key(session, cassette), self._session_key(session)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hincrby(counters, key, 1)
            pipe.expire(counters, SESSION_TTL_S)
            pipe.sadd(cassettes, cassette)
            pipe.expire(cassettes, SESSION_TTL_S)
            claimed, *_ = await pipe.execute()
        return int(claimed)

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        await self._client.eval(_RELEASE_CLAIM, 1, self._sequence_key(session, cassette), key)

    async def reset_session(self, session: str) -> None:
        cassettes = await self._client.smembers(self._session_key(session))
        for cassette in cassettes:
            await self._client.delete(self._sequence_key(session, cassette.decode()))
        await self._client.delete(self._session_key(session))

    async def close(self) -> None:
        await self._client.aclose()
