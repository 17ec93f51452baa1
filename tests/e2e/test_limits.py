"""Limits under faults: answers too large to store, endless or hanging upstreams, clients that
leave. The proxy stays bounded and keeps serving.

The upstream here is a small real aiohttp server whose answers misbehave on purpose (an endless
body, a hang, a gzip bomb, a trickle); the simulator covers the well-behaved API.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx2
import orjson
import pytest
from aiohttp import web
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.tools.testing import ProxyThread, ServerThread, run_proxy

from tests.conftest import ProxyFactory, recorded_files

AUTH = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
MIB = 1024 * 1024


class Misbehaving:
    """A real upstream whose chat answers depend on the request's `model`:

    `endless` (a JSON body that never ends), `hang` (no head for a minute), `slow-ok` (a small
    answer after 1 s), `bomb` (8 MiB of JSON sent as 8 KiB of gzip), `trickle` (a byte every
    0.1 s, never idle long, never done), anything else: a small answer at once.
    """

    def __init__(self) -> None:
        self.open = 0  # answers being written
        self.ended: Counter[str] = Counter()  # answers ended, by model, however they ended
        self.calls = 0
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.server = ServerThread(lambda: web.AppRunner(app, access_log=None,
                                                         handler_cancellation=True,
                                                         shutdown_timeout=0.5))

    @property
    def url(self) -> str:
        return self.server.url

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model"))
        with self._lock:
            self.calls += 1
            self.open += 1
        try:
            return await self._answer(request, model, body)
        finally:
            with self._lock:
                self.open -= 1
                self.ended[model] += 1

    async def _answer(self, request: web.Request, model: str,
                      body: dict[str, object]) -> web.StreamResponse:
        small = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                              "seed": body.get("seed"), "choices": []})
        if model == "hang":
            await asyncio.sleep(60)
        if model == "slow-ok":
            await asyncio.sleep(1.0)
        if model == "endless":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            chunk = b" " * 65536
            while True:
                await response.write(chunk)
        if model == "trickle":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            while True:
                await response.write(b" ")
                await asyncio.sleep(0.1)
        if model == "long-stream":  # 2 MiB of events, then [DONE]
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            event = b"data: " + orjson.dumps({"choices": [{"delta": {"content": "x" * 65000}}]})
            for _ in range(32):
                await response.write(event + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        if model == "bomb":
            payload = b'{"data": "' + b"0" * (8 * MIB) + b'"}'
            return web.Response(body=gzip.compress(payload, 9), headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"})
        return web.Response(body=small, content_type="application/json")


@pytest.fixture
def upstream() -> Iterator[Misbehaving]:
    misbehaving = Misbehaving()
    misbehaving.server.start()
    try:
        yield misbehaving
    finally:
        misbehaving.server.stop()


def _settings(cassettes: Path, upstream: Misbehaving, **overrides: object) -> Settings:
    return replace(Settings(cassettes=cassettes, mode=Mode.RECORD, openai_upstream=upstream.url),
                   **overrides)


def _chat(model: str, seed: int = 1) -> bytes:
    return orjson.dumps({"model": model, "seed": seed,
                         "messages": [{"role": "user", "content": "Hi"}]})


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _flights(proxy: ProxyThread) -> int:
    return int(proxy.invoke(lambda: len(proxy.state.flights._flights)))


def test_an_answer_over_max_answer_streams_through_and_is_not_stored(
        upstream: Misbehaving, cassettes: Path, caplog: pytest.LogCaptureFixture) -> None:
    with run_proxy(_settings(cassettes, upstream, max_answer=MIB)) as proxy:
        # 8 KiB of gzip on the wire, 8 MiB decoded: the limit holds for what would be stored.
        response = httpx2.post(proxy.url + "/v1/chat/completions", content=_chat("bomb"),
                               headers=AUTH, timeout=30)
        assert response.status_code == 200
        assert len(response.content) > 8 * MIB
        assert response.headers["x-replay-status"] == "passthrough"
        assert recorded_files(cassettes) == []
        stats = httpx2.get(proxy.url + "/_replay/stats").json()
        assert stats["totals"]["too_large"] == 1
        # Still serving, and a small answer is recorded as usual.
        ok = httpx2.post(proxy.url + "/v1/chat/completions", content=_chat("ok"), headers=AUTH)
        assert ok.headers["x-replay-status"] == "recorded"
    assert len(recorded_files(cassettes)) == 1
    assert any("--max-answer" in record.getMessage() and record.levelno == logging.WARNING
               for record in caplog.records)


def test_a_stream_over_max_answer_reaches_the_client_whole_and_is_not_stored(
        upstream: Misbehaving, cassettes: Path) -> None:
    with run_proxy(_settings(cassettes, upstream, max_answer=MIB)) as proxy:
        response = httpx2.post(proxy.url + "/v1/chat/completions", content=_chat("long-stream"),
                               headers=AUTH, timeout=30)
        assert response.status_code == 200
        assert response.content.count(b"data: ") == 33 and response.content.endswith(
            b"data: [DONE]\n\n")
        proxy.call(proxy.state.flights.drain())
        assert httpx2.get(proxy.url + "/_replay/stats").json()["totals"]["too_large"] == 1
        assert recorded_files(cassettes) == []


def test_an_endless_body_is_passed_through_at_the_clients_pace(
        upstream: Misbehaving, cassettes: Path) -> None:
    with run_proxy(_settings(cassettes, upstream, max_answer=MIB)) as proxy:
        received = 0
        with httpx2.stream("POST", proxy.url + "/v1/chat/completions", content=_chat("endless"),
                           headers=AUTH, timeout=10) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
                if received > 4 * MIB:
                    break  # it keeps coming, a chunk at a time: nothing waits for the end
        # The client hung up: the upstream call is cancelled, the flight is gone.
        assert _wait_for(lambda: upstream.ended["endless"] == 1)
        assert _wait_for(lambda: _flights(proxy) == 0)
        assert recorded_files(cassettes) == []


def test_a_client_that_stops_reading_holds_the_upstream_back(upstream: Misbehaving,
                                                             cassettes: Path) -> None:
    with run_proxy(_settings(cassettes, upstream, max_answer=MIB)) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        body = _chat("endless")
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer sk-test\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = 0
        while received < 2 * MIB:
            received += len(sock.recv(65536))
        # The client reads no more but stays: the proxy keeps at most its pass-through buffer
        # (1 MiB) and a chunk, whatever the upstream would send.
        time.sleep(1.0)
        buffered = proxy.invoke(lambda: [flight._buffered for flight in
                                         proxy.state.flights._flights.values()])
        time.sleep(0.5)
        assert buffered and max(buffered) <= MIB + 256 * 1024, buffered
        assert proxy.invoke(lambda: [flight._buffered for flight in
                                     proxy.state.flights._flights.values()]) == buffered
    assert _wait_for(lambda: upstream.ended["endless"] == 1)


def test_a_client_that_leaves_a_non_stream_answer_cancels_the_upstream_call(
        upstream: Misbehaving, cassettes: Path) -> None:
    with run_proxy(_settings(cassettes, upstream)) as proxy:
        for model in ("trickle", "hang"):  # a body that never ends, an answer never begun
            with pytest.raises(httpx2.TimeoutException):
                httpx2.post(proxy.url + "/v1/chat/completions", content=_chat(model),
                            headers=AUTH, timeout=0.5)
            # aiohttp does not cancel the handler; the proxy notices the closed connection.
            assert _wait_for(lambda model=model: upstream.ended[model] == 1), model
        assert _wait_for(lambda: _flights(proxy) == 0 and upstream.open == 0)
        assert recorded_files(cassettes) == []


@pytest.mark.load
async def test_abandoned_calls_to_a_hanging_upstream_free_their_connections(
        upstream: Misbehaving, cassettes: Path) -> None:
    with run_proxy(_settings(cassettes, upstream)) as proxy:
        limits = httpx2.Limits(max_connections=60)
        async with httpx2.AsyncClient(limits=limits, timeout=0.5) as client:
            results = await asyncio.gather(*(
                client.post(proxy.url + "/v1/chat/completions", content=_chat("hang", seed),
                            headers=AUTH) for seed in range(60)), return_exceptions=True)
        assert all(isinstance(result, httpx2.TimeoutException) for result in results)
        # Every call that reached the upstream is cancelled (on a busy machine a client may
        # give up before its call was even made).
        assert await asyncio.to_thread(
            _wait_for, lambda: upstream.open == 0 and _flights(proxy) == 0)
        assert upstream.ended["hang"] == upstream.calls > 0
        async with httpx2.AsyncClient(timeout=10) as client:
            healthy = await client.post(proxy.url + "/v1/chat/completions", content=_chat("ok"),
                                        headers=AUTH)
        assert healthy.status_code == 200 and healthy.headers["x-replay-status"] == "recorded"


async def test_a_flight_with_a_client_left_keeps_going(upstream: Misbehaving,
                                                       cassettes: Path) -> None:
    with run_proxy(_settings(cassettes, upstream)) as proxy:
        url = proxy.url + "/v1/chat/completions"
        async with httpx2.AsyncClient(timeout=10) as patient, \
                httpx2.AsyncClient(timeout=0.3) as impatient:
            waiting = asyncio.ensure_future(patient.post(url, content=_chat("slow-ok"),
                                                         headers=AUTH))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx2.TimeoutException):
                await impatient.post(url, content=_chat("slow-ok"), headers=AUTH)
            answer = await waiting
        assert answer.status_code == 200 and answer.headers["x-replay-status"] == "recorded"
    assert upstream.calls == 1
    assert len(recorded_files(cassettes)) == 1


def test_the_total_upstream_timeout_ends_an_answer_that_never_pauses(
        upstream: Misbehaving, cassettes: Path) -> None:
    settings = _settings(cassettes, upstream, upstream_timeout=5.0, upstream_total_timeout=1.0)
    with run_proxy(settings) as proxy:
        started = time.monotonic()
        response = httpx2.post(proxy.url + "/v1/chat/completions", content=_chat("trickle"),
                               headers=AUTH, timeout=30)
        assert time.monotonic() - started < 5
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert response.headers["x-should-retry"] == "true"
        assert _wait_for(lambda: upstream.ended["trickle"] == 1)
        assert recorded_files(cassettes) == []



def test_with_no_cache_memory_every_answer_is_read_from_the_store(make_proxy: ProxyFactory,
                                                                  cassettes: Path) -> None:
    """--cache-mb 0: no entry or reply fits in memory, so none is held; each request reads
    its file, and a file deleted meanwhile is a miss at once."""
    chat = {"model": "gpt-4o-mini", "seed": 1, "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"Authorization": "Bearer sk-test"}
    with make_proxy(Mode.RECORD) as proxy:
        assert httpx2.post(proxy.url + "/v1/chat/completions", json=chat,
                           headers=headers).status_code == 200
    with make_proxy(Mode.REPLAY, cache_mb=0) as proxy:
        answers = [httpx2.post(proxy.url + "/v1/chat/completions", json=chat, headers=headers)
                   for _ in range(3)]
        assert [a.headers["x-replay-status"] for a in answers] == ["hit"] * 3
        assert answers[0].content == answers[2].content
        stats = httpx2.get(proxy.url + "/_replay/stats").json()
        assert stats["memory"]["entries"] == 0 and stats["memory"]["hot_replies"] == 0
        assert "hot_hits" not in stats["totals"]
        [recorded] = recorded_files(cassettes)
        recorded.unlink()
        gone = httpx2.post(proxy.url + "/v1/chat/completions", json=chat, headers=headers)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "replay_miss"
