"""A fleet on a real three-node Redis Cluster: two proxies share it as they would share one
Redis, and a node that goes away takes only its own cassettes with it, for as long as it is
away."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx2
import orjson
import pytest
from click.testing import CliRunner
from openai import OpenAI
from redis.crc import key_slot
from replay_proxy.core.cassette import Entry, Recording
from replay_proxy.store import open_store
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import (
    RedisClusterNodes,
    SimulatorThread,
    run_proxy_process,
    run_redis_cluster,
)

CHAT = {"model": "gpt-4o-mini", "seed": 3, "messages": [{"role": "user", "content": "Cluster?"}]}
HEADERS = {"Authorization": "Bearer sk-x", "Content-Type": "application/json"}


def chat(seed: int) -> bytes:
    return orjson.dumps({**CHAT, "seed": seed})


async def test_300_identical_misses_over_two_proxies_make_one_upstream_call(
        redis_cluster_url: str, simulator: SimulatorThread, tmp_path: Path) -> None:
    simulator.state.latency = 0.5  # every request arrives while the first is upstream
    common = ("--mode", "record", "--store", redis_cluster_url, "--cassettes", str(tmp_path),
              "--openai-upstream", simulator.url)
    with run_proxy_process(*common) as (first, _), run_proxy_process(*common) as (second, _):
        limits = httpx2.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
            responses = await asyncio.gather(*(
                client.post(url + "/c/burst/v1/chat/completions", content=chat(3),
                            headers=HEADERS)
                for url in [first, second] * 150))
    assert [r.status_code for r in responses] == [200] * 300
    assert len({r.content for r in responses}) == 1, "every client got the same answer"
    assert simulator.state.calls == 1
    assert sorted({r.headers["x-replay-status"] for r in responses}) == ["hit", "recorded"]


def test_what_one_proxy_records_the_other_replays(
        redis_cluster_url: str, simulator: SimulatorThread, tmp_path: Path) -> None:
    common = ("--store", redis_cluster_url, "--cassettes", str(tmp_path))
    cassettes = [f"suite-{number}" for number in range(6)]  # spread over the three nodes
    recorded = {}
    with run_proxy_process("--mode", "record", "--openai-upstream", simulator.url,
                           *common) as (recorder, _):
        for name in cassettes:
            with OpenAI(base_url=f"{recorder}/c/{name}/v1", api_key="sk-x") as client:
                recorded[name] = (client.chat.completions.create(**CHAT),
                                  list(client.chat.completions.create(**CHAT, stream=True)))
    simulator.stop()
    with run_proxy_process("--mode", "replay", *common) as (replayer, _):
        for name in cassettes:
            with OpenAI(base_url=f"{replayer}/c/{name}/v1", api_key="x") as client:
                raw = client.chat.completions.with_raw_response.create(**CHAT)
                assert raw.headers["x-replay-status"] == "hit"
                assert raw.parse() == recorded[name][0]
                assert list(client.chat.completions.create(**CHAT, stream=True)) == \
                    recorded[name][1]


def test_export_and_import_between_the_cluster_and_cassettes(
        redis_cluster_url: str, simulator: SimulatorThread, tmp_path: Path) -> None:
    with run_proxy_process("--mode", "record", "--cassettes", str(tmp_path / "dir"),
                           "--openai-upstream", simulator.url) as (url, _):
        for name in ("one", "two/nested", "three"):
            with OpenAI(base_url=f"{url}/c/{name}/v1", api_key="sk-x") as client:
                client.chat.completions.create(**CHAT)
                list(client.chat.completions.create(**CHAT, stream=True))
    runner = CliRunner()
    for command, source, target in (("import", tmp_path / "dir", redis_cluster_url),
                                    ("export", redis_cluster_url, tmp_path / "back")):
        result = runner.invoke(main, [command, "--from", str(source), "--to", str(target)])
        assert result.exit_code == 0 and "copied 6 key(s)" in result.output, result.output
    originals = sorted((tmp_path / "dir").rglob("*.json"))
    originals = [path for path in originals if ".replay-proxy" not in path.parts]
    assert len(originals) == 6
    for path in originals:
        copy = tmp_path / "back" / path.relative_to(tmp_path / "dir")
        assert copy.read_bytes() == path.read_bytes()


def _cassettes_on_two_nodes(cluster: RedisClusterNodes) -> tuple[str, str, int]:
    """Two cassette names whose slots live on different nodes, and the first one's node."""
    owners = {name: cluster.slot_owner(key_slot(name.encode()))
              for name in (f"team-{number}" for number in range(20))}
    doomed = next(iter(owners))
    spared = next(name for name, port in owners.items() if port != owners[doomed])
    return doomed, spared, owners[doomed]


def _assert_whole(url: str) -> None:
    """Every indexed key has its entry and every entry is indexed: nothing half-written."""
    import redis

    client = redis.RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
    try:
        entries = {key.decode() for key in client.scan_iter(match="replay:{*}:e:*",
                                                            target_nodes=client.ALL_NODES)}
        indexed = set()
        for index in client.scan_iter(match="replay:{*}:index", target_nodes=client.ALL_NODES):
            cassette = index.decode()[len("replay:"):-len(":index")]
            indexed |= {f"replay:{cassette}:e:{key.decode()}" for key in client.smembers(index)}
        assert entries == indexed
    finally:
        client.close()


async def test_a_node_going_away_takes_only_its_cassettes_and_comes_back(
        simulator: SimulatorThread, tmp_path: Path) -> None:
    with run_redis_cluster() as cluster:
        doomed, spared, port = _cassettes_on_two_nodes(cluster)
        with run_proxy_process("--mode", "record", "--store", cluster.url, "--cassettes",
                               str(tmp_path), "--openai-upstream", simulator.url) as (url, _):
            async with httpx2.AsyncClient(timeout=30) as client:

                async def ask(cassette: str, seed: int) -> httpx2.Response:
                    return await client.post(f"{url}/c/{cassette}/v1/chat/completions",
                                             content=chat(seed), headers=HEADERS)

                for cassette in (doomed, spared):
                    assert (await ask(cassette, 1)).status_code == 200
                cluster.stop(port)
                during = await asyncio.gather(*(ask(cassette, seed) for seed in range(2, 12)
                                                for cassette in (doomed, spared)))
                for response in during[0::2]:  # the cassette on the stopped node
                    assert response.status_code == 503, response.text
                    error = response.json()["error"]
                    assert error["code"] == "store_unavailable"
                    assert doomed in error["message"] and "retry" in error["message"]
                assert [r.status_code for r in during[1::2]] == [200] * 10
                assert (await client.get(url + "/_replay/health")).status_code == 200
                assert (await ask(doomed, 1)).status_code == 200  # remembered: no store call

                cluster.start(port)
                cluster.wait_healthy()
                for _ in range(50):  # the node rejoins; the proxy needs no restart
                    again = await ask(doomed, 2)
                    if again.status_code == 200:
                        break
                    assert again.json()["error"]["code"] == "store_unavailable"
                    await asyncio.sleep(0.2)
                assert again.status_code == 200, again.text
                assert again.headers["x-replay-status"] == "recorded"
                assert (await ask(doomed, 2)).headers["x-replay-status"] == "hit"
        _assert_whole(cluster.url)
        store = open_store(cluster.url)
        try:
            assert await store.cassettes() == sorted([doomed, spared])
            assert len(await store.items(doomed)) == 2  # seeds 1 and 2: none of the 503s
            assert len(await store.items(spared)) == 11
        finally:
            await store.close()


def test_cluster_url_forms(redis_cluster: RedisClusterNodes, redis_cluster_url: str) -> None:
    """`redis://...?cluster=true` is the same store; more nodes to start from with `nodes=`."""
    first, *others = redis_cluster.ports
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()

    async def round_trip(url: str) -> list[str]:
        store = open_store(url)
        try:
            await store.put("forms", _entry())
            return await store.cassettes()
        finally:
            await store.close()

    assert asyncio.run(round_trip(f"redis://127.0.0.1:{first}/0?cluster=true")) == ["forms"]
    # The first node named is down: the others listed in nodes= find the cluster.
    nodes = ",".join(f"127.0.0.1:{port}" for port in others)
    assert asyncio.run(round_trip(
        f"redis+cluster://127.0.0.1:{dead_port}/?nodes={nodes}")) == ["forms"]
    with pytest.raises(ValueError, match="only database 0"):
        open_store(f"redis+cluster://127.0.0.1:{first}/3")


def _entry() -> Entry:
    return Entry("a" * 64, "chat.completions", {"route": "chat/completions"}).add(
        Recording(200, {"content-type": "application/json"}, body=b"{}"))


async def test_a_cluster_named_as_one_server_says_to_use_the_cluster_url(
        redis_cluster: RedisClusterNodes, redis_cluster_url: str) -> None:
    """The symptom that a plain client meets on a cluster, MOVED, names the fix."""
    from replay_proxy.core.errors import StoreUnavailable

    port = redis_cluster.ports[0]
    elsewhere = next(f"suite-{n}" for n in range(50)
                     if redis_cluster.slot_owner(key_slot(f"suite-{n}".encode())) != port)
    store = open_store(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(StoreUnavailable, match=r"use redis\+cluster://"):
            await store.get(elsewhere, "a" * 64, "chat.completions")
    finally:
        await store.close()
