"""One contract, every backend: what the proxy relies on from a store."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from replay_proxy.core.cassette import Entry, Recording, SseEvent
from replay_proxy.core.errors import CassetteError
from replay_proxy.store import Store, open_store

BACKENDS: dict[str, Callable[[Path], str]] = {
    "directory": lambda tmp: str(tmp / "cassettes"),
    "diskcache": lambda tmp: f"diskcache:{tmp / 'cache'}",
}


# Redis backends, each a fixture giving a clean store URL: one server, a three-node cluster,
# one server over TLS with a client certificate, a user and a password, and a Valkey cluster
# (skipped where valkey-server is not installed).
REDIS_BACKENDS = {"redis": "redis_url", "redis-cluster": "redis_cluster_url",
                  "redis-tls": "redis_tls_url", "valkey-cluster": "valkey_cluster_url"}


@pytest.fixture(params=[*sorted(BACKENDS), *REDIS_BACKENDS])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param in REDIS_BACKENDS:
        spec = request.getfixturevalue(REDIS_BACKENDS[request.param])
    else:
        spec = BACKENDS[request.param](tmp_path)
    backend = open_store(spec)
    yield backend
    await backend.close()


def entry(key: str, answer: bytes = b'{"answer":1}', label: str = "chat.completions") -> Entry:
    return Entry(key, label, {"route": "chat/completions", "body": {"seed": 1}}).add(
        Recording(200, {"content-type": "application/json"}, body=answer,
                  system_fingerprint="fp_a", recorded_at="t"))


async def test_get_missing_is_none(store: Store) -> None:
    assert await store.get("default", "0" * 64, "chat.completions") is None


async def test_put_then_get_round_trips(store: Store) -> None:
    stream = Entry("5" * 64, "responses", {"route": "responses"}).add(Recording(
        200, {"content-type": "text/event-stream"},
        events=(SseEvent(0.5, b"event: a\ndata: {}\n\n"), SseEvent(1.0, b"\xff\x00\n\n"))))
    binary = entry("b" * 64, answer=b"\x00ID3\xff", label="audio.speech")
    for item in (entry("a" * 64), stream, binary):
        await store.put("default", item)
        assert await store.get("default", item.key, item.label) == item


async def test_put_replaces_and_keeps_recordings_in_order(store: Store) -> None:
    first = entry("a" * 64)
    await store.put("suite", first)
    second = first.add(Recording(200, {}, body=b"{}", system_fingerprint="fp_b"))
    await store.put("suite", second)
    got = await store.get("suite", first.key, first.label)
    assert got is not None
    assert [r.system_fingerprint for r in got.recordings] == ["fp_a", "fp_b"]
    assert got.pinned_fingerprint == "fp_a"


async def test_cassettes_are_separate_and_listed(store: Store) -> None:
    await store.put("one", entry("a" * 64))
    await store.put("two/nested", entry("b" * 64))
    assert await store.cassettes() == ["one", "two/nested"]
    assert await store.get("two/nested", "a" * 64, "chat.completions") is None
    assert [item.key for item in await store.items("one")] == ["a" * 64]
    assert [item.entry for item in await store.items("two/nested")] == [entry("b" * 64)]


async def test_delete(store: Store) -> None:
    await store.put("default", entry("a" * 64))
    assert await store.delete("default", "a" * 64, "chat.completions") is True
    assert await store.delete("default", "a" * 64, "chat.completions") is False
    assert await store.get("default", "a" * 64, "chat.completions") is None


async def test_directory_store_names_files_readably_and_reports_corruption(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.put("default", entry("a" * 64))
    await store.put("default", entry("b" * 64))
    path = tmp_path / "default" / f"chat.completions-{'a' * 64}.json"
    assert path.is_file()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    path.write_bytes(b'{"format": 1, "trunc')
    with pytest.raises(CassetteError, match=str(path)):
        await store.get("default", "a" * 64, "chat.completions")
    assert await store.get("default", "b" * 64, "chat.completions") == entry("b" * 64)
    items = {item.key: item for item in await store.items("default")}
    assert items["a" * 64].error is not None and items["b" * 64].entry is not None


async def test_lock_serialises_holders(store: Store) -> None:
    import asyncio

    order: list[str] = []

    async def holder(name: str) -> None:
        async with store.lock("default", "k" * 64):
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    await asyncio.gather(holder("a"), holder("b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


async def test_redis_keys_are_namespaced_by_cassette_with_ttl(redis_url: str) -> None:
    import redis.asyncio as redis

    store = open_store(redis_url + "?ttl=60&prefix=team")
    await store.put("suite-a", entry("a" * 64))
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in await client.keys("*"))
    assert f"team:{{suite-a}}:e:{'a' * 64}" in keys and "team:{suite-a}:index" in keys
    assert 0 < await client.ttl(f"team:{{suite-a}}:e:{'a' * 64}") <= 60
    await client.aclose()
    await store.close()


@pytest.mark.parametrize("fixture", ["redis_url", "redis_cluster_url"])
async def test_redis_writes_start_no_thread(fixture: str, request: pytest.FixtureRequest,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis write is one script on the proxy's loop. redis-py's asyncio cluster transactions
    run each queued command on a loop of their own in a new thread and join it: the proxy's
    loop stood still for every write, and once hung for good while stopping."""
    backend = open_store(request.getfixturevalue(fixture))
    try:
        await backend.get("warm", "0" * 64, "chat.completions")  # connections and layout
        started: list[str] = []
        original = threading.Thread.start

        def start(thread: threading.Thread) -> None:
            started.append(thread.name)
            original(thread)

        monkeypatch.setattr(threading.Thread, "start", start)
        await backend.put("writes", entry("a" * 64))
        assert await backend.claim_occurrence("s1", "writes", "a" * 64) == 1
        assert await backend.delete("writes", "a" * 64, "chat.completions") is True
        monkeypatch.undo()
        assert started == []
        assert await backend.items("writes") == []
    finally:
        await backend.close()


async def test_directory_writes_leave_the_event_loop_on_a_slow_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from replay_proxy.store import directory

    writers: list[threading.Thread] = []
    write = directory._write_atomically

    def watched(path: Path, data: bytes) -> None:
        writers.append(threading.current_thread())
        write(path, data)

    monkeypatch.setattr(directory, "_write_atomically", watched)
    store = open_store(tmp_path / "cassettes")
    try:
        await store.put("default", entry("a" * 64))  # fast: written on the loop's thread
        await store.put("default", entry("b" * 64))
        monkeypatch.setattr(directory, "SLOW_WRITE_S", 0.0)  # every disk is slow now
        await store.put("default", entry("c" * 64))  # ... so this one goes to a thread
        assert writers[:2] == [threading.current_thread()] * 2
        assert writers[2] is not threading.current_thread()
        for key in ("a", "b", "c"):
            assert await store.get("default", key * 64, "chat.completions") == entry(key * 64)
    finally:
        await store.close()


async def test_occurrences_count_per_session_cassette_and_key(store: Store) -> None:
    claims = [await store.claim_occurrence("s1", "default", "k" * 64) for _ in range(3)]
    assert claims == [1, 2, 3]
    assert await store.claim_occurrence("s2", "default", "k" * 64) == 1  # another session
    assert await store.claim_occurrence("s1", "other", "k" * 64) == 1  # another cassette
    assert await store.claim_occurrence("s1", "default", "j" * 64) == 1  # another key


async def test_a_released_claim_is_given_again_and_never_below_zero(store: Store) -> None:
    assert await store.claim_occurrence("s", "default", "k" * 64) == 1
    assert await store.claim_occurrence("s", "default", "k" * 64) == 2
    await store.release_occurrence("s", "default", "k" * 64)
    assert await store.claim_occurrence("s", "default", "k" * 64) == 2
    for _ in range(4):
        await store.release_occurrence("s", "default", "k" * 64)
    assert await store.claim_occurrence("s", "default", "k" * 64) == 1


async def test_reset_starts_one_session_again(store: Store) -> None:
    for cassette in ("a", "b/nested"):
        for _ in range(2):
            await store.claim_occurrence("s1", cassette, "k" * 64)
    await store.claim_occurrence("s2", "a", "k" * 64)
    await store.reset_session("s1")
    assert await store.claim_occurrence("s1", "a", "k" * 64) == 1
    assert await store.claim_occurrence("s1", "b/nested", "k" * 64) == 1
    assert await store.claim_occurrence("s2", "a", "k" * 64) == 2  # untouched


@pytest.mark.parametrize("backend", sorted(BACKENDS))
async def test_two_instances_of_a_local_store_share_their_counters(backend: str,
                                                                   tmp_path: Path) -> None:
    """As two `--workers` processes do: the n-th poll is counted in one place."""
    first, second = open_store(BACKENDS[backend](tmp_path)), open_store(BACKENDS[backend](tmp_path))
    try:
        seen = [await store.claim_occurrence("s", "c", "k" * 64)
                for store in (first, second, first, second)]
        assert seen == [1, 2, 3, 4]
    finally:
        await first.close()
        await second.close()


def test_counters_are_shared_with_another_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    spec = BACKENDS["directory"](tmp_path)
    script = ("import asyncio, sys\n"
              "from replay_proxy.store import open_store\n"
              "async def main():\n"
              "    store = open_store(sys.argv[1])\n"
              "    print(await store.claim_occurrence('s', 'c', 'k' * 64))\n"
              "    await store.close()\n"
              "asyncio.run(main())\n")
    outputs = [subprocess.run([sys.executable, "-c", script, spec], capture_output=True,
                              text=True, check=True).stdout.strip() for _ in range(3)]
    assert outputs == ["1", "2", "3"]


async def test_counters_fall_back_to_memory_where_the_folder_cannot_be_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read-only checkout still replays sequences; its counters stay in this process."""
    root = tmp_path / "cassettes"
    (root / ".replay-proxy").mkdir(parents=True)
    (root / ".replay-proxy" / "sequences").write_text("not a folder")
    store = open_store(str(root))
    try:
        assert [await store.claim_occurrence("s", "c", "k" * 64) for _ in range(2)] == [1, 2]
        await store.release_occurrence("s", "c", "k" * 64)
        assert await store.claim_occurrence("s", "c", "k" * 64) == 2
        await store.reset_session("s")
        assert await store.claim_occurrence("s", "c", "k" * 64) == 1
        assert "counting in this process only" in caplog.text
    finally:
        await store.close()
