"""A write that fails (a full disk, say) is loud: an error naming the key and the cause, a
`store_errors` counter, and a proxy that keeps serving and stops cleanly."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path

import httpx2
import orjson
import pytest
import redis
from replay_proxy.core.cassette import Entry
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.server.handler import ReplayProxy
from replay_proxy.store import Store, StoredItem, open_store
from replay_proxy.tools.testing import ProxyThread, SimulatorThread, run_redis

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

AUTH = {"Authorization": f"Bearer {SECRET_KEY}", "Content-Type": "application/json"}


class FullDisk:
    """The real directory store, except that its writes fail while `full` is set: the fault a
    full disk gives (ENOSPC), injected where no test can make a real disk full."""

    def __init__(self, real: Store) -> None:
        self.real = real
        self.description = real.description
        self.full = True

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        return await self.real.get(cassette, key, label)

    async def put(self, cassette: str, entry: Entry) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        await self.real.put(cassette, entry)

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        return await self.real.delete(cassette, key, label)

    async def cassettes(self) -> list[str]:
        return await self.real.cassettes()

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        return await self.real.items(cassette)

    def lock(self, cassette: str, key: str) -> AbstractAsyncContextManager[None]:
        return self.real.lock(cassette, key)

    async def claim_occurrence(self, session: str, cassette: str, key: str) -> int:
        return await self.real.claim_occurrence(session, cassette, key)

    async def release_occurrence(self, session: str, cassette: str, key: str) -> None:
        await self.real.release_occurrence(session, cassette, key)

    async def reset_session(self, session: str) -> None:
        await self.real.reset_session(session)

    async def close(self) -> None:
        await self.real.close()


def _chat(seed: int, stream: bool = False) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "seed": seed, "stream": stream,
                         "messages": [{"role": "user", "content": "Hi"}]})


def test_failed_writes_are_logged_counted_and_the_proxy_keeps_serving(
        simulator: SimulatorThread, cassettes: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FullDisk(open_store(str(cassettes)))
    settings = Settings(cassettes=cassettes, mode=Mode.RECORD, openai_upstream=simulator.url)
    proxy = ProxyThread(lambda: ReplayProxy(settings, {}, store=store))
    proxy.start()
    try:
        keys = []
        for seed in range(6):
            response = httpx2.post(proxy.url + "/c/full/v1/chat/completions",
                                   content=_chat(seed, stream=seed % 2 == 1), headers=AUTH)
            assert response.status_code == 200  # the client has its answer all the same
            keys.append(response.headers["x-replay-key"])
        proxy.call(proxy.state.flights.drain())
        stats = httpx2.get(proxy.url + "/_replay/stats").json()
        assert stats["totals"]["store_errors"] == 6
        assert stats["cassettes"]["full"]["store_errors"] == 6
        assert "recorded" not in stats["totals"]
        assert recorded_files(cassettes) == []
        store.full = False  # space again: recording goes on
        again = httpx2.post(proxy.url + "/c/full/v1/chat/completions", content=_chat(0),
                            headers=AUTH)
        assert again.headers["x-replay-status"] == "recorded"
        proxy.call(proxy.state.flights.drain())
        assert len(recorded_files(cassettes)) == 1
    finally:
        proxy.stop()
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 6
    for key, record in zip(keys, errors, strict=True):
        message = record.getMessage()
        assert key in message and "No space left on device" in message
        assert record.exc_info is None
    assert not [record for record in caplog.records if record.exc_info], "a clean stop"


def test_a_usage_log_that_cannot_be_written_does_not_stop_the_proxy(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from replay_proxy.server.usage import UsageLog

    usage = UsageLog(tmp_path / ".replay-proxy")
    blocked = usage.run_file
    blocked.mkdir(parents=True)  # the run file cannot be replaced, as on a full disk
    usage.note("c", "k" * 64)
    usage.flush({"totals": {}})
    usage.flush({"totals": {}})
    assert [record.levelno for record in caplog.records] == [logging.WARNING]  # said once
    blocked.rmdir()
    usage.flush({"totals": {"hits": 1}})
    assert orjson.loads(blocked.read_bytes())["totals"] == {"hits": 1}
    assert usage.failing is False


# Redis calls that give up quickly: a hung server is noticed within a second.
FAST_FAILING = "?timeout=0.2&pool_timeout=0.2"


@contextmanager
def frozen(client: redis.Redis) -> Iterator[None]:
    """The Redis server stopped (SIGSTOP): connections stay open, nothing is answered."""
    pid = int(client.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_redis_store_that_stops_answering_is_a_503_then_recording_resumes(
        make_proxy: ProxyFactory, simulator: SimulatorThread,
        caplog: pytest.LogCaptureFixture) -> None:
    with run_redis() as url:
        client = redis.Redis.from_url(url)
        store = url + FAST_FAILING
        with make_proxy(Mode.RECORD, store=store) as proxy:

            def ask(seed: int) -> httpx2.Response:
                return httpx2.post(proxy.url + "/c/shared/v1/chat/completions",
                                   content=_chat(seed), headers=AUTH, timeout=10)

            assert ask(1).headers["x-replay-status"] == "recorded"
            calls = simulator.state.calls
            with frozen(client):  # Redis hangs: every call runs out of time
                outage = [ask(seed) for seed in (2, 3)]
                remembered = ask(1)
            for response in outage:
                assert response.status_code == 503, response.text
                assert response.headers["x-should-retry"] == "true"
                error = response.json()["error"]
                assert error["code"] == "store_unavailable" and error["type"] == "store_error"
                assert "'shared'" in error["message"] and "retry" in error["message"]
                assert "TimeoutError" in error["message"]
            assert simulator.state.calls == calls  # nothing sent upstream meanwhile
            assert remembered.headers["x-replay-status"] == "hit"  # held in memory
            back = ask(2)
            assert back.status_code == 200 and back.headers["x-replay-status"] == "recorded"
            proxy.call(proxy.state.flights.drain())
        # Nothing from the outage was stored half-way: two entries, both indexed.
        assert client.smembers("replay:{shared}:index") == {
            key.rsplit(b":", 1)[1] for key in client.keys("replay:{shared}:e:*")}
        assert len(client.keys("replay:{shared}:e:*")) == 2
        client.close()
    said = [record.getMessage() for record in caplog.records
            if record.name == "replay_proxy.store.redis"]
    assert len([line for line in said if "out of reach for cassette 'shared'" in line]) == 1
    assert len([line for line in said if "reachable again for cassette 'shared'" in line]) == 1
    assert not any("password" in line for line in said)


def test_a_redis_store_that_hangs_while_an_answer_is_recorded_loses_only_that_write(
        make_proxy: ProxyFactory, simulator: SimulatorThread,
        caplog: pytest.LogCaptureFixture) -> None:
    with run_redis() as url:
        client = redis.Redis.from_url(url)
        with make_proxy(Mode.RECORD, store=url + FAST_FAILING) as proxy:
            simulator.state.latency = 0.3  # the store hangs while the upstream answers
            answers: list[httpx2.Response] = []
            asking = threading.Thread(target=lambda: answers.append(httpx2.post(
                proxy.url + "/c/shared/v1/chat/completions", content=_chat(1), headers=AUTH,
                timeout=10)))
            asking.start()
            deadline = time.monotonic() + 5
            while simulator.state.calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the key's lock is taken and the call is upstream
            with frozen(client):
                asking.join(timeout=10)
                proxy.call(proxy.state.flights.drain())  # storing gave up meanwhile
            simulator.state.latency = 0
            [answer] = answers
            assert answer.status_code == 200 and answer.json()["choices"]  # the client's
            stats = httpx2.get(proxy.url + "/_replay/stats").json()["cassettes"]["shared"]
            assert stats["store_errors"] == 1 and "recorded" not in stats
            # The transaction Redis had received runs when it wakes: stored whole or not at all.
            entries = client.keys("replay:{shared}:e:*")
            assert len(entries) <= 1
            assert client.smembers("replay:{shared}:index") == {
                key.rsplit(b":", 1)[1] for key in entries}
            again = httpx2.post(proxy.url + "/c/shared/v1/chat/completions", content=_chat(1),
                                headers=AUTH)
            assert again.headers["x-replay-status"] == ("hit" if entries else "recorded")
            assert httpx2.post(proxy.url + "/c/shared/v1/chat/completions", content=_chat(2),
                               headers=AUTH).headers["x-replay-status"] == "recorded"
        client.close()
    [error] = [record.getMessage() for record in caplog.records
               if record.levelno >= logging.ERROR]
    assert answer.headers["x-replay-key"] in error
    assert "did not confirm the write" in error and "or not at all" in error


def test_a_warmed_cassette_replays_through_a_redis_outage(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with run_redis() as url:
        client = redis.Redis.from_url(url)
        store = url + FAST_FAILING
        with make_proxy(Mode.RECORD, store=store) as proxy:
            for seed in (1, 2):
                assert httpx2.post(proxy.url + "/c/warm/v1/chat/completions",
                                   content=_chat(seed), headers=AUTH).status_code == 200
        with make_proxy(Mode.REPLAY, store=store) as proxy:
            warm = httpx2.post(proxy.url + "/_replay/warm", json={"cassettes": ["warm"]})
            assert warm.json() == {"queued": 1}
            deadline = time.monotonic() + 5
            while httpx2.get(proxy.url + "/_replay/stats").json()["memory"]["entries"] < 2:
                assert time.monotonic() < deadline, "the cassette was not read ahead"
                time.sleep(0.02)
            with frozen(client):
                hits = [httpx2.post(proxy.url + "/c/warm/v1/chat/completions",
                                    content=_chat(seed), headers=AUTH) for seed in (1, 2)]
                other = httpx2.post(proxy.url + "/c/warm/v1/chat/completions",
                                    content=_chat(3), headers=AUTH)
            assert [hit.headers["x-replay-status"] for hit in hits] == ["hit", "hit"]
            assert other.status_code == 503
            assert other.json()["error"]["code"] == "store_unavailable"
        client.close()
