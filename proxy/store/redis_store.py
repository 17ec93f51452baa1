"""Entries in Redis or a Redis Cluster, shared by a fleet of proxies and CI runners.

Keys: `<prefix>:{<cassette>}:e:<key>` holds the encoded entry (the same bytes as a cassette
file), `<prefix>:{<cassette>}:index` the set of the cassette's keys. The cassette sits in braces,
a Redis Cluster hash tag, so all of one cassette's keys live in one slot, and every write is a
script on that one slot: a cassette never spans nodes, and a node that goes
away takes only its own cassettes with it. The cassettes are listed by scanning for their
index keys (on every node of a cluster), so no write touches a second slot.

Sequence counters: `<prefix>:{<cassette>}:seq:<session>` is a hash of key -> occurrences
claimed, in the cassette's slot; it expires a day after last use. Resetting a session scans
for its counters.

Key locks are leases: `<prefix>:{<cassette>}:lock:<key>` expires after LEASE_MS unless its
holder renews it, so a holder that died is noticed within seconds.

URL forms and options: see `redis_url`. Any failure to reach Redis (a node down, a timeout, no
free connection within pool_timeout) raises `StoreUnavailable`, a 503 for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from ..core.cassette import Entry, encode_entry
from ..core.errors import StoreUnavailable
from .base import StoredItem, checked_entry, stored_item, writable_name
from .redis_url import RedisTarget, parse_redis_url

try:
    from redis import asyncio as redis
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ValueError(
        "The Redis store needs redis-py: pip install 'replay-proxy[redis]'."
    ) from exc

log = logging.getLogger("replay_proxy.store.redis")

# Release a lock only if it is still ours; extend it likewise.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_EXTEND = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")
# Give back a claim without going below zero.
_RELEASE_CLAIM = ("local v = redis.call('hget', KEYS[1], ARGV[1]) "
                  "if v and tonumber(v) > 0 then return redis.call('hincrby', KEYS[1], ARGV[1], -1) "
                  "end return 0")
# Writes are scripts, not MULTI transactions: redis-py's asyncio cluster pipeline (8.1) runs
# each queued command of a transaction on a new event loop in a thread and joins it, which
# stalls this loop for every write and can hang it for good.
# Store an entry (with a TTL in seconds, when ARGV[3] is not empty) and index its key.
_PUT = ("if ARGV[3] == '' then redis.call('set', KEYS[1], ARGV[1]) "
        "else redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[3]) end "
        "redis.call('sadd', KEYS[2], ARGV[2]) return 1")
# Delete an entry and its index member; 1 when the entry was there.
_DELETE = ("local removed = redis.call('del', KEYS[1]) redis.call('srem', KEYS[2], ARGV[1]) "
           "return removed")
# Claim the next occurrence of a key in a session's sequence, and keep the counters a day.
_CLAIM = ("local claimed = redis.call('hincrby', KEYS[1], ARGV[1], 1) "
          "redis.call('expire', KEYS[1], ARGV[2]) return claimed")
# Forget index members whose entry expired, unless a writer stored it again meanwhile.
_FORGET_EXPIRED = ("local gone = 0 for i = 2, #KEYS do if redis.call('exists', KEYS[i]) == 0 then "
                   "gone = gone + redis.call('srem', KEYS[1], ARGV[i - 1]) end end return gone")
LEASE_MS = 5_000  # a dead lock holder is noticed within this; a live one renews every third
SESSION_TTL_S = 24 * 3600
_LOCK_WAIT_S = 900.0  # an upstream answer that takes longer is not waited for
_MGET_BATCH = 256
# Failing to reach Redis, as opposed to Redis refusing a command: these make a 503.
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError,
                redis_errors.ClusterError, redis_errors.TryAgainError,
                redis_errors.ReadOnlyError, redis_errors.RedisClusterException,
                redis_errors.MovedError, OSError, TimeoutError)


class RedisStore:
    def __init__(self, url: str) -> None:
        target = parse_redis_url(url)
        self.target = target
        self.description = target.description
        self.prefix, self.ttl = target.prefix, target.ttl
        self._client: Any
        # redis-py's blocking pool makes a call wait for a free connection (up to
        # pool_timeout) instead of failing; its cluster client has none and raises at
        # max_connections, so a semaphore of that size keeps it below: one store call uses
        # at most one connection per node.
        self._gate: asyncio.Semaphore | None = None
        # The cluster client learns the cluster's layout at its first command; commands sent
        # concurrently meanwhile can find their connections closed under them (redis-py 8.1),
        # so the first call learns it alone.
        self._discovery: asyncio.Lock | None = None
        if target.cluster:
            self._discovery = asyncio.Lock()
            self._client = _cluster_client(target)
            self._gate = asyncio.Semaphore(target.max_connections)
        else:
            self._client = _server_client(target)
        self._failing: set[str] = set()  # what is down now, so each outage is logged once

    # ---- keys -----------------------------------------------------------------------------

    def _entry_key(self, cassette: str, key: str) -> str:
        return f"{self.prefix}:{{{cassette}}}:e:{key}"

    def _index_key(self, cassette: str) -> str:
        return f"{self.prefix}:{{{cassette}}}:index"

    def _sequence_key(self, session: str, cassette: str) -> str:
        return f"{self.prefix}:{{{cassette}}}:seq:{session}"

    # ---- the Store protocol ----------------------------------------------------------------

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        async with self._call(cassette):
            raw = await self._client.get(self._entry_key(cassette, key))
        if raw is None:
            return None
        return checked_entry(bytes(raw), f"{self.description} [{cassette}/{label}-{key}]", key)

    async def put(self, cassette: str, entry: Entry) -> None:
        writable_name(cassette, entry.key, entry.label)
        encoded = encode_entry(entry)
        try:
            async with self._call(cassette):
                await self._client.eval(_PUT, 2, self._entry_key(cassette, entry.key),
                                        self._index_key(cassette), encoded, entry.key,
                                        "" if self.ttl is None else str(self.ttl))
        except StoreUnavailable as exc:
            # A script sent before Redis stopped answering runs when it answers again:
            # the write is unconfirmed, not undone.
            raise StoreUnavailable(
                f"The Redis store {self.description} did not confirm the write of "
                f"{cassette}/{entry.label}-{entry.key} ({self._reason(exc.__cause__ or exc)}): "
                "it is stored whole once the store answers again, or not at all.") from exc

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        async with self._call(cassette):
            removed = await self._client.eval(_DELETE, 2, self._entry_key(cassette, key),
                                              self._index_key(cassette), key)
        return bool(removed)

    async def cassettes(self) -> list[str]:
        head, tail = f"{self.prefix}:{{", "}:index"
        names = set()
        async with self._call(None):
            async for found in self._client.scan_iter(match=f"{head}*{tail}", count=1000):
                text = bytes(found).decode()
                names.add(text[len(head):-len(tail)])
        return sorted(names)

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        index = self._index_key(cassette)
        found: list[StoredItem] = []
        async with self._call(cassette):
            keys = sorted(key.decode() for key in await self._client.smembers(index))
            expired = []
            for start in range(0, len(keys), _MGET_BATCH):  # one slot: MGET is allowed
                batch = keys[start:start + _MGET_BATCH]
                values = await self._client.mget([self._entry_key(cassette, k) for k in batch])
                for key, raw in zip(batch, values, strict=True):
                    if raw is None:
                        expired.append(key)
                        continue
                    found.append(stored_item(cassette, "", key, bytes(raw),
                                             f"{self.description} [{cassette}/{key}]"))
            if expired:
                await self._client.eval(_FORGET_EXPIRED, 1 + len(expired), index,
                                        *(self._entry_key(cassette, k) for k in expired),
                                        *expired)
        return found

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        return self._lock(cassette, f"{self.prefix}:{{{cassette}}}:lock:{key}")

    @contextlib.asynccontextmanager
    async def _lock(self, cassette: str, name: str,
                    timeout: float = _LOCK_WAIT_S) -> AsyncIterator[None]:
        """A lease renewed while held, so a holder that died frees it within LEASE_MS."""
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while True:
            async with self._call(cassette):
                taken = await self._client.set(name, token, nx=True, px=LEASE_MS)
            if taken:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for the Redis lock {name}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

        released = asyncio.Event()
        renewal = loop.create_task(self._renew(cassette, name, token, released))
        try:
            yield
        finally:
            # The event, not only the cancel, ends the renewals: a redis-py call that is under
            # way when its task is cancelled can swallow the cancel and return normally (seen
            # with redis-py 8.1 under load), and a renewal that missed it would extend the
            # lease for ever while this waits for it.
            released.set()
            renewal.cancel()
            # Whatever stopped the renewals, the lease ends below or runs out by itself.
            await asyncio.gather(renewal, return_exceptions=True)
            try:
                async with self._call(cassette):
                    await self._client.eval(_RELEASE, 1, name, token)
            except StoreUnavailable:
                pass  # the lease runs out by itself

    async def _renew(self, cassette: str, name: str, token: str,
                     released: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(released.wait(), LEASE_MS / 3000)
            except TimeoutError:
                pass  # time to renew
            else:
                return
            try:
                async with self._call(cassette):
                    held = await self._client.eval(_EXTEND, 1, name, token, LEASE_MS)
            except StoreUnavailable:
                continue  # logged once by _call; the next renewal may reach it again
            if not held:
                log.warning("lost the Redis lock %s (its lease ran out while the store was "
                            "out of reach): another proxy may record the same key", name)
                return

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        counters = self._sequence_key(session, cassette)
        async with self._call(cassette):
            claimed = await self._client.eval(_CLAIM, 1, counters, key, SESSION_TTL_S)
        return int(claimed)

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        async with self._call(cassette):
            await self._client.eval(_RELEASE_CLAIM, 1, self._sequence_key(session, cassette), key)

    async def reset_session(self, session: str) -> None:
        async with self._call(None):
            found = [bytes(name) async for name in self._client.scan_iter(
                match=f"{self.prefix}:{{*}}:seq:{session}", count=1000)]
            for name in found:  # one by one: each counter is in its cassette's slot
                await self._client.delete(name)

    async def close(self) -> None:
        await self._client.aclose()

    # ---- every call: bounded, and a clear 503 when Redis is out of reach --------------------

    @contextlib.asynccontextmanager
    async def _call(self, cassette: str | None) -> AsyncIterator[None]:
        target = self.target
        what = f"cassette {cassette!r}" if cassette is not None else "listing"
        try:
            async with asyncio.timeout(target.pool_timeout + 2 * target.timeout):
                if self._gate is None:
                    yield
                else:
                    if self._discovery is not None:
                        await self._discover()
                    async with asyncio.timeout(target.pool_timeout):
                        await self._gate.acquire()
                    try:
                        yield
                    finally:
                        self._gate.release()
        except _UNREACHABLE as exc:
            reason = self._reason(exc)
            if what not in self._failing:
                self._failing.add(what)
                log.warning("Redis store %s is out of reach for %s: %s", self.description,
                            what, reason)
            raise StoreUnavailable(
                f"The Redis store {self.description} could not be reached for {what} "
                f"({reason}). Nothing was stored for this request; retry it once the store "
                "is back (the proxy reconnects by itself).") from exc
        if what in self._failing:
            self._failing.discard(what)
            log.warning("Redis store %s is reachable again for %s", self.description, what)

    async def _discover(self) -> None:
        assert self._discovery is not None
        async with self._discovery:
            await self._client.initialize()
        self._discovery = None

    def _reason(self, exc: BaseException) -> str:
        text = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        if isinstance(exc, redis_errors.MovedError) and not self.target.cluster:
            text += "; this Redis is a cluster: use redis+cluster:// (or cluster=true)"
        if isinstance(exc, TimeoutError) and not str(exc):  # a bound of _call ran out
            text = "no free connection or no answer in time"
        password = self.target.password
        text = text.rstrip(".")
        return text.replace(password, "***") if password else text


def _server_client(target: RedisTarget) -> Any:
    kwargs = target.connection_kwargs()
    connection_class: type[Any]
    if target.socket_path is not None:
        connection_class, kwargs["path"] = redis.UnixDomainSocketConnection, target.socket_path
    else:
        connection_class = redis.SSLConnection if kwargs.pop("ssl", False) else redis.Connection
        kwargs.update(host=target.host, port=target.port)
    pool = redis.BlockingConnectionPool(connection_class=connection_class, db=target.db,
                                        max_connections=target.max_connections,
                                        timeout=target.pool_timeout, **kwargs)
    return redis.Redis.from_pool(pool)


def _cluster_client(target: RedisTarget) -> Any:
    assert target.host is not None and target.port is not None
    seeds = [(target.host, target.port), *target.seeds]
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        max_connections=target.max_connections,
        # Serve the slots that are up while another node is down or moving.
        require_full_coverage=False,
        # A node that is down fails the call within a second or so; its cassettes answer 503
        # and the next call tries again, so there is no point retrying for longer.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
        **target.connection_kwargs())
