"""Streams are teed while recording and replayed with the same bytes and event boundaries."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import ReplayTiming
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Stream a poem."}]}


def _chunks(stream: Any) -> list[Any]:
    return [chunk for chunk in stream]


def test_chat_stream_records_and_replays_chunk_for_chunk(make_proxy: ProxyFactory,
                                                         simulator: SimulatorThread,
                                                         cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        recorded = _chunks(client.chat.completions.create(**CHAT, seed=3, stream=True))
        with_usage = _chunks(client.chat.completions.create(
            **CHAT, seed=3, stream=True, stream_options={"include_usage": True}))
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        raw = client.chat.completions.with_raw_response.create(**CHAT, seed=3, stream=True)
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-replay-status"] == "hit"
        replayed = _chunks(raw.parse())
        replayed_usage = _chunks(client.chat.completions.create(
            **CHAT, seed=3, stream=True, stream_options={"include_usage": True}))
    assert replayed == recorded
    assert len(recorded) > 5 and recorded[0].system_fingerprint == "fp_sim_a1b2c3"
    assert replayed_usage == with_usage and with_usage[-1].usage is not None
    stored = next(p for p in cassettes.rglob("chat.completions-*.json")
                  if "include_usage" not in p.read_text())
    text = stored.read_text()
    assert '{"at_ms":' in text and '"raw":"data: [DONE]\\n\\n"}' in text
    assert '"object":"chat.completion.chunk"' in text  # the events' JSON, readable
    assert '"at_ms"' in stored.read_text()


@pytest.mark.parametrize("timing", ["none", "recorded"])
def test_replayed_bytes_and_event_boundaries_are_identical(make_proxy: ProxyFactory,
                                                           timing: str) -> None:
    def fetch(url: str) -> tuple[bytes, list[bytes], httpx2.Headers]:
        with httpx2.stream("POST", url + "/v1/chat/completions",
                           json={**CHAT, "seed": 9, "stream": True},
                           headers={"Authorization": f"Bearer {SECRET_KEY}"}) as response:
            body = b"".join(response.iter_bytes())
        return body, body.split(b"\n\n"), response.headers

    with make_proxy(Mode.RECORD, replay_timing=ReplayTiming.parse(timing)) as proxy:
        live, live_events, live_headers = fetch(proxy.url)
        replayed, replayed_events, headers = fetch(proxy.url)
    assert replayed == live and replayed_events == live_events
    assert headers["x-replay-status"] == "hit" and live_headers["x-replay-status"] == "recorded"
    # Framed as the provider's stream is, however fast it is replayed.
    assert headers["transfer-encoding"] == live_headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers


async def test_async_and_azure_streams(make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        async with AsyncOpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY) as client:
            stream = await client.chat.completions.create(**CHAT, seed=1, stream=True)
            recorded = [chunk async for chunk in stream]
        async with AsyncAzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21",
                                    api_key=SECRET_KEY) as azure:
            stream = await azure.chat.completions.create(**CHAT, seed=1, stream=True)
            azure_recorded = [chunk async for chunk in stream]
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy:
        async with AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x") as client:
            stream = await client.chat.completions.create(**CHAT, seed=1, stream=True)
            assert [chunk async for chunk in stream] == recorded
        async with AsyncAzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21",
                                    api_key="x") as azure:
            stream = await azure.chat.completions.create(**CHAT, seed=1, stream=True)
            assert [chunk async for chunk in stream] == azure_recorded
        entries = await proxy.state.store.items("default")
    # Azure's first chunk carries only content-filter results and no fingerprint: the recording
    # takes the first non-empty one.
    assert {item.entry.recordings[0].system_fingerprint for item in entries
            if item.entry is not None} == {"fp_sim_a1b2c3"}
    assert azure_recorded[0].choices == []


def test_sync_azure_stream(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy, AzureOpenAI(
            azure_endpoint=proxy.url, api_version="2024-10-21", api_key=SECRET_KEY) as client:
        first = _chunks(client.chat.completions.create(**CHAT, seed=4, stream=True))
        second = _chunks(client.chat.completions.create(**CHAT, seed=4, stream=True))
    assert first == second


def test_responses_api_streams(make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        events = list(client.responses.create(model="gpt-4o-mini", input="Hi", stream=True))
        with client.responses.stream(model="gpt-4o-mini", input="Hello") as stream:
            helper_events = list(stream)
            final = stream.get_final_response()
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        assert list(client.responses.create(model="gpt-4o-mini", input="Hi", stream=True)) \
            == events
        with client.responses.stream(model="gpt-4o-mini", input="Hello") as stream:
            assert list(stream) == helper_events
            assert stream.get_final_response() == final
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert final.output_text and final.output_text == "".join(
        e.delta for e in helper_events if e.type == "response.output_text.delta")


def test_legacy_completions_stream(make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "seed": 2}
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        recorded = _chunks(client.completions.create(**request, stream=True))
        plain = client.completions.create(**request)
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        assert _chunks(client.completions.create(**request, stream=True)) == recorded
        assert client.completions.create(**request) == plain
    assert recorded[0].choices[0].text.strip()


def test_upstream_cut_mid_stream_stores_nothing_and_client_sees_the_cut(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> None:
    simulator.state.faults = ["cut:4"]
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY, max_retries=0) as client:
        received = []
        with pytest.raises((httpx2.RemoteProtocolError, openai.APIError, httpx2.ReadError)):
            for chunk in client.chat.completions.create(**CHAT, seed=5, stream=True):
                received.append(chunk)
        assert 0 < len(received) < 6
        assert not recorded_files(cassettes)
        # The proxy keeps serving and records the next, complete stream.
        complete = _chunks(client.chat.completions.create(**CHAT, seed=5, stream=True))
    assert complete[-1].choices[0].finish_reason == "stop"
    assert len(recorded_files(cassettes)) == 1


def test_stream_without_done_is_stored_at_clean_end(make_proxy: ProxyFactory, cassettes: Path,
                                                    simulator: SimulatorThread) -> None:
    # The Responses API ends with response.completed and no [DONE].
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        list(client.responses.create(model="gpt-4o-mini", input="Hi", stream=True))
    stored = next(cassettes.rglob("responses-*.json")).read_text()
    assert "[DONE]" not in stored and "response.completed" in stored


def test_slow_upstream_stream_is_teed_not_buffered(make_proxy: ProxyFactory,
                                                   simulator: SimulatorThread) -> None:
    simulator.state.event_delay = 0.1
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        started = time.monotonic()
        arrivals = [time.monotonic() - started
                    for _ in client.chat.completions.create(**CHAT, seed=6, stream=True)]
    assert arrivals[-1] > 1.0  # about 15 events 0.1 s apart
    assert arrivals[0] < arrivals[-1] / 3, "the first chunk must arrive long before the last"


def test_replay_timing_recorded_reproduces_the_gaps(make_proxy: ProxyFactory,
                                                    simulator: SimulatorThread) -> None:
    simulator.state.event_delay = 0.05
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        started = time.monotonic()
        _chunks(client.chat.completions.create(**CHAT, seed=8, stream=True))
        original = time.monotonic() - started
    simulator.stop()
    durations = {}
    for timing in ("none", "recorded", "2x"):
        with make_proxy(Mode.REPLAY, replay_timing=ReplayTiming.parse(timing)) as proxy, \
                OpenAI(base_url=proxy.url + "/v1", api_key="x") as client:
            started = time.monotonic()
            _chunks(client.chat.completions.create(**CHAT, seed=8, stream=True))
            durations[timing] = time.monotonic() - started
    assert original > 0.5
    assert 0.6 * original < durations["recorded"] < 1.6 * original + 0.3
    assert durations["2x"] < durations["recorded"]
    assert durations["none"] < 0.4 * original


async def test_concurrent_identical_streams_make_one_upstream_call(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    simulator.state.event_delay = 0.02
    with make_proxy(Mode.RECORD) as proxy:
        async with AsyncOpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY) as client:
            async def consume() -> list[Any]:
                stream = await client.chat.completions.create(**CHAT, stream=True)
                return [chunk async for chunk in stream]

            results = await asyncio.gather(*(consume() for _ in range(6)))
    assert simulator.state.calls == 1
    assert all(result == results[0] for result in results)  # unseeded, yet one shared answer


def test_an_http_1_0_client_gets_a_replayed_stream_whole(make_proxy: ProxyFactory) -> None:
    # HTTP/1.0 has no chunked encoding: the same bytes come with a length instead.
    body = json.dumps({**CHAT, "seed": 11, "stream": True}).encode()
    with make_proxy(Mode.RECORD) as proxy:
        recorded = httpx2.post(proxy.url + "/v1/chat/completions", content=body,
                               headers={"Authorization": f"Bearer {SECRET_KEY}",
                                        "Content-Type": "application/json"})
        assert recorded.headers["x-replay-status"] == "recorded"
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: "
                           b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
    head, _, replayed = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"X-Replay-Status: hit" in head
    assert b"Transfer-Encoding" not in head and b"Content-Length: %d" % len(replayed) in head
    assert replayed == recorded.content and replayed.endswith(b"data: [DONE]\n\n")
