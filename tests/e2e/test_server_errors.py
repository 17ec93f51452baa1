"""The server's error paths as a client meets them: an answer cut on its way through, an
upstream that is not configured, a sequenced request that failed, an Expect the proxy cannot
meet, a miss log it cannot write, a client that leaves mid-replay. Each time the client gets a
clear answer (or a visibly broken one), nothing is stored half-way, and the proxy keeps
serving."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import httpx2
import openai
import orjson
import pytest
from openai import AzureOpenAI, OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import ReplayTiming, Settings
from replay_proxy.server.handler import ReplayProxy
from replay_proxy.tools.testing import ProxyThread, SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}
CHAT = {"model": "gpt-4o-mini", "seed": 1, "messages": [{"role": "user", "content": "Hi"}]}


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=SECRET_KEY, max_retries=0, timeout=10)


def _stats(proxy: ProxyThread) -> dict[str, int]:
    totals: dict[str, int] = httpx2.get(proxy.url + "/_replay/stats").json()["totals"]
    return totals


@pytest.mark.parametrize(("fault", "stream"), [("reset_body", False), ("cut:2", True)])
def test_an_answer_too_large_to_keep_cut_on_its_way_through_reaches_the_client_cut(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path, fault: str,
        stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    simulator.state.faults = [fault]
    with make_proxy(Mode.RECORD, max_answer=64, record_errors=True) as proxy:
        with pytest.raises(httpx2.HTTPError):  # never a short answer that looks whole
            with httpx2.stream("POST", proxy.url + "/v1/chat/completions", headers=AUTH,
                               json={**CHAT, "stream": stream}, timeout=10) as response:
                if not stream:  # (a stream's head goes out before its size is known)
                    assert response.headers["x-replay-status"] == "passthrough"
                response.read()
        proxy.call(proxy.state.flights.drain())
        assert _stats(proxy)["too_large"] == 1
        assert recorded_files(cassettes) == []
        # Still serving, and an answer within the limit is recorded as usual.
        simulator.state.faults = []
        with make_proxy(Mode.RECORD) as fresh, _client(fresh.url) as client:
            assert client.chat.completions.create(**CHAT).choices
        assert httpx2.get(proxy.url + "/_replay/health").json()["status"] == "ok"
    assert len(recorded_files(cassettes)) == 1
    assert any("over --max-answer" in record.getMessage() for record in caplog.records)


def test_a_provider_without_an_upstream_is_a_502_naming_the_option(
        make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD, azure_upstream=None) as proxy, \
            AzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21", api_key="k",
                        max_retries=0) as azure, _client(proxy.url) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            azure.chat.completions.create(**CHAT)
        assert caught.value.status_code == 502
        error = caught.value.response.json()["error"]
        assert error["type"] == "upstream_error" and error["code"] == "upstream_not_configured"
        assert caught.value.response.headers["x-should-retry"] == "false"  # a retry cannot help
        assert "--azure-upstream" in error["message"]
        assert recorded_files(cassettes) == []
        assert client.chat.completions.create(**CHAT).choices  # OpenAI requests still go
    assert len(recorded_files(cassettes)) == 1


def test_a_sequenced_request_that_failed_upstream_gives_its_place_to_the_retry(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    simulator.state.faults = ["status:500"]
    with make_proxy(Mode.RECORD) as proxy, _client(proxy.url) as client:
        with pytest.raises(openai.InternalServerError):
            client.vector_stores.create(name="docs")
        retried = client.vector_stores.with_raw_response.create(name="docs")
        assert retried.headers["x-replay-sequence"] == "1/1"  # the first place, not the second
        created = retried.parse().id
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _client(proxy.url) as client:
        assert client.vector_stores.create(name="docs").id == created
        with pytest.raises(openai.NotFoundError) as past:
            client.vector_stores.create(name="docs")
        assert past.value.response.json()["error"]["code"] == "sequence_exhausted"


def test_an_expect_other_than_100_continue_is_a_417(make_proxy: ProxyFactory,
                                                    cassettes: Path) -> None:
    body = orjson.dumps(CHAT)
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.post(proxy.url + "/v1/chat/completions", content=body,
                               headers={**AUTH, "Content-Type": "application/json",
                                        "Expect": "200-ok"})
        assert response.status_code == 417
        error = response.json()["error"]
        assert error["code"] == "expectation_failed" and "100-continue" in error["message"]
        assert recorded_files(cassettes) == []
        assert httpx2.post(proxy.url + "/v1/chat/completions", content=body,
                           headers={**AUTH, "Content-Type": "application/json"}).status_code == 200


def test_a_miss_log_that_cannot_be_written_leaves_the_404s_alone(
        simulator: SimulatorThread, cassettes: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(cassettes=cassettes, mode=Mode.REPLAY, openai_upstream=simulator.url)
    # /dev/full: every write fails with ENOSPC, as on a full disk.
    proxy = ProxyThread(lambda: ReplayProxy(settings, {}, miss_log=Path("/dev/full")))
    proxy.start()
    try:
        with _client(proxy.url) as client:
            for seed in range(3):
                with pytest.raises(openai.NotFoundError) as missed:
                    client.chat.completions.create(**{**CHAT, "seed": seed})
                assert missed.value.response.json()["error"]["code"] == "replay_miss"
        assert _stats(proxy)["misses"] == 3
    finally:
        proxy.stop()
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and "miss log" in record.getMessage()]
    assert len(warnings) == 1 and "/dev/full" in warnings[0]  # said once, not per miss


def test_a_client_leaving_a_paced_replay_stops_it_quietly(
        make_proxy: ProxyFactory, simulator: SimulatorThread,
        caplog: pytest.LogCaptureFixture) -> None:
    simulator.state.event_delay = 0.02
    with make_proxy(Mode.RECORD) as proxy, _client(proxy.url) as client:
        recorded = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(**CHAT, stream=True) if chunk.choices)
    with make_proxy(Mode.REPLAY, replay_timing=ReplayTiming(1.0)) as proxy:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            body = orjson.dumps({**CHAT, "stream": True})
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                         b"Bearer " + SECRET_KEY.encode() + b"\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.close()  # gone after the first event, while the replay waits for the next
        with _client(proxy.url) as client:
            replayed = "".join(chunk.choices[0].delta.content or "" for chunk in
                               client.chat.completions.create(**CHAT, stream=True)
                               if chunk.choices)
        assert replayed == recorded
        assert _stats(proxy)["hits"] == 4
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_miss_log_past_its_limit_still_lists_every_miss_without_the_text(
        tmp_path: Path) -> None:
    from replay_proxy.server.sessions import MissLog

    path = tmp_path / "misses.jsonl"
    miss_log = MissLog(path, limit=200)
    try:
        for number in range(4):
            miss_log.write("run.gw0.1", "chat", f"miss {number}: " + "why " * 60)
    finally:
        miss_log.close()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["session"] for line in lines] == ["run.gw0.1"] * 4  # none dropped
    assert lines[0]["message"].startswith("miss 0: why")
    assert all("message" not in line for line in lines[1:])
