"""Redis under load and faults: hundreds of concurrent requests per proxy wait for a pooled
connection rather than fail, and a key lock whose holder was killed is free within seconds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx2
import orjson
import pytest
from replay_proxy.store import open_store
from replay_proxy.store.redis_store import LEASE_MS
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

HEADERS = {"Authorization": "Bearer sk-x", "Content-Type": "application/json"}
CONCURRENT = 300


def chat(seed: int) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "seed": seed,
                         "messages": [{"role": "user", "content": "Load?"}]})


async def burst(requests: list[tuple[str, bytes]]) -> list[httpx2.Response]:
    """Every request at once, each on its own connection."""
    limits = httpx2.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(url, content=body, headers=HEADERS)
                                      for url, body in requests))


def statuses(responses: list[httpx2.Response]) -> dict[tuple[int, str], int]:
    counted: dict[tuple[int, str], int] = {}
    for response in responses:
        seen = (response.status_code, response.headers.get("x-replay-status", ""))
        counted[seen] = counted.get(seen, 0) + 1
    return counted


async def stored(url: str, expected: int, timeout: float = 120) -> dict[str, int]:
    """A proxy's stored and failed recordings, once they add up to `expected` (or at the
    deadline)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx2.AsyncClient(timeout=30) as client:
        while True:
            totals = (await client.get(url + "/_replay/stats")).json()["totals"]
            found = {name: int(totals.get(name, 0)) for name in ("recorded", "store_errors")}
            if sum(found.values()) >= expected or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.1)


@pytest.mark.load
@pytest.mark.parametrize(("backend", "options", "proxies"), [
    ("redis_url", "", 1),
    # Two proxies of 300 on two shared cores can queue for a connection longer than the
    # default 5 s when the machine is busy: what is tested is that they queue instead of fail.
    ("redis_url", "?pool_timeout=30", 2),
    # Two connections for 300 concurrent requests: every store call waits its turn.
    ("redis_url", "?max_connections=2&pool_timeout=30", 1),
    ("redis_cluster_url", "?pool_timeout=30", 2),
    ("redis_cluster_url", "?max_connections=2&pool_timeout=30", 1),
], ids=["redis-1-proxy", "redis-2-proxies", "redis-tiny-pool", "cluster-2-proxies",
        "cluster-tiny-pool"])
async def test_300_concurrent_requests_per_proxy_all_succeed(
        request: pytest.FixtureRequest, backend: str, options: str, proxies: int,
        simulator: SimulatorThread, tmp_path: Path) -> None:
    store = request.getfixturevalue(backend) + options
    common = ("--store", store, "--cassettes", str(tmp_path))
    path = "/c/load/v1/chat/completions"
    with ExitStack() as stack:
        urls = [stack.enter_context(run_proxy_process(
            "--mode", "record", "--openai-upstream", simulator.url, *common))[0]
            for _ in range(proxies)]
        recorded = await burst([(url + path, chat(number * CONCURRENT + seed))
                                for number, url in enumerate(urls)
                                for seed in range(CONCURRENT)])
        # The answers come before the writes: every one is stored, none failed, before the
        # proxies are stopped.
        for url in urls:
            assert await stored(url, CONCURRENT) == {"recorded": CONCURRENT, "store_errors": 0}
    assert statuses(recorded) == {(200, "recorded"): CONCURRENT * proxies}
    # Fresh proxies remember nothing: every hit reads the store.
    with ExitStack() as stack:
        urls = [stack.enter_context(run_proxy_process("--mode", "replay", *common))[0]
                for _ in range(proxies)]
        replayed = await burst([(url + path, chat(number * CONCURRENT + seed))
                                for number, url in enumerate(urls)
                                for seed in range(CONCURRENT)])
    assert statuses(replayed) == {(200, "hit"): CONCURRENT * proxies}
    assert [r.content for r in replayed] == [r.content for r in recorded]


HOLDER = """
import asyncio, sys
from replay_proxy.store import open_store

async def main():
    store = open_store(sys.argv[1])
    async with store.lock("locked", "k" * 64):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["redis_url", "redis_cluster_url"])
async def test_a_killed_lock_holder_frees_its_key_within_seconds(
        request: pytest.FixtureRequest, backend: str) -> None:
    url = request.getfixturevalue(backend)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE)
    store = open_store(url)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        # Alive, the holder renews its lease: the key stays locked past the lease's length.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(LEASE_MS / 1000 * 1.5):
                async with store.lock("locked", "k" * 64):
                    pytest.fail("took a lock that its live holder still renews")
        holder.kill()  # kill -9: no release, no goodbye
        holder.wait()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        async with asyncio.timeout(8):  # a few seconds, not a 30-second lock's life
            async with store.lock("locked", "k" * 64):
                waited = loop.time() - killed
        assert waited <= LEASE_MS / 1000 + 1
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        await store.close()


@pytest.mark.load
@pytest.mark.parametrize("backend", ["redis_url", "redis_cluster_url"])
async def test_locks_released_while_their_lease_is_renewed_are_free_at_once(
        request: pytest.FixtureRequest, backend: str) -> None:
    """Each holder lets go about when its renewal is due, so many releases land while a
    renewal's call is under way; the renewal must stop then (a renewal that outlived its lock
    would hold it, and the holder, for ever)."""
    store = open_store(request.getfixturevalue(backend) + "?max_connections=4&pool_timeout=30")
    renew_every = LEASE_MS / 3000

    async def hold(number: int) -> None:
        async with store.lock("held", f"{number:064x}"):
            await asyncio.sleep(renew_every + (number % 101 - 50) / 1000)  # -50 ms to +50 ms

    try:
        async with asyncio.timeout(renew_every * 4):
            await asyncio.gather(*(hold(number) for number in range(CONCURRENT)))
        # Every lease was released, none left to run out.
        for number in range(CONCURRENT):
            async with asyncio.timeout(1):
                async with store.lock("held", f"{number:064x}"):
                    pass
    finally:
        await store.close()
