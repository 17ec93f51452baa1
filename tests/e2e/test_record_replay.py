"""Record with the real openai SDK against the simulator, stop it, replay offline."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from click.testing import CliRunner
from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

from tests.conftest import (
    ORG_ID,
    PROJECT_ID,
    SECRET_KEY,
    ProxyFactory,
    recorded_files,
    stored_bytes,
)

CHAT = {"model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Name a fact about Mars."}]}


def _exchanges(client: OpenAI) -> list[tuple[str, Any, bytes]]:
    """Every kind of call the foundation must replay, as (name, parsed object, raw bytes)."""
    calls = {
        "chat_seeded": lambda: client.chat.completions.with_raw_response.create(**CHAT, seed=7),
        "chat_unseeded": lambda: client.chat.completions.with_raw_response.create(
            **CHAT, temperature=0.7),
        "embedding_float": lambda: client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input="hello", encoding_format="float"),
        "embedding_base64": lambda: client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["a", "b"], encoding_format="base64"),
        "responses": lambda: client.responses.with_raw_response.create(
            model="gpt-4o-mini", input="Say hi"),
        "models": lambda: client.models.with_raw_response.list(),
        "model": lambda: client.models.with_raw_response.retrieve("gpt-4o"),
    }
    results = []
    for name, call in calls.items():
        raw = call()
        parsed = raw.parse()
        if name == "models":
            parsed = parsed.data  # a page object holds its client; compare what it listed
        results.append((name, parsed, raw.http_response.content))
    return results


def test_sync_client_records_then_replays_offline(make_proxy: ProxyFactory,
                                                   simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        recorded = _exchanges(client)
    calls_while_recording = simulator.state.calls
    assert calls_while_recording == len(recorded)
    simulator.stop()

    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="no-key-needed") as client:
        replayed = _exchanges(client)
        assert proxy.state.totals["hits"] == len(recorded)
        assert proxy.state.totals["upstream_calls"] == 0

    for (name, recorded_object, recorded_raw), (_, replayed_object, replayed_raw) in zip(
            recorded, replayed, strict=True):
        assert replayed_raw == recorded_raw, name
        assert replayed_object == recorded_object, name
    chat = replayed[0][1]
    assert chat.id.startswith("chatcmpl-") and chat.system_fingerprint == "fp_sim_a1b2c3"
    assert chat.usage.total_tokens > 0
    floats, packed = replayed[2][1], replayed[3][1]
    assert len(floats.data[0].embedding) == 16 and isinstance(floats.data[0].embedding[0], float)
    assert len(packed.data) == 2 and len(base64.b64decode(packed.data[1].embedding)) == 16 * 4


def test_status_and_key_headers(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        first = client.chat.completions.with_raw_response.create(**CHAT, seed=1)
        second = client.chat.completions.with_raw_response.create(**CHAT, seed=1)
    # The SDK accepts gzip, so the upstream compressed its answer; it is stored decoded.
    assert "gzip" in simulator.state.last_headers["accept-encoding"]
    assert '"body_encoding": "json-indent"' in recorded_files(cassettes)[0].read_text()
    assert first.headers["x-replay-status"] == "recorded"
    assert second.headers["x-replay-status"] == "hit"
    assert first.headers["x-replay-key"] == second.headers["x-replay-key"]
    assert len(first.headers["x-replay-key"]) == 64
    assert second.headers["x-replay-fingerprint"] == "fp_sim_a1b2c3"


def test_passthrough_stores_nothing(make_proxy: ProxyFactory, cassettes: Path,
                                    simulator: SimulatorThread) -> None:
    with make_proxy(Mode.PASSTHROUGH) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                       api_key=SECRET_KEY) as client:
        one = client.chat.completions.with_raw_response.create(**CHAT, seed=1)
        client.chat.completions.create(**CHAT, seed=1)
    assert one.headers["x-replay-status"] == "passthrough"
    assert simulator.state.calls == 2
    assert not recorded_files(cassettes)


def test_auto_mode_replays_under_ci(make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT, seed=5)
    from replay_proxy.tools.testing import (
        run_proxy,  # auto mode reads CI from the environ it is given
    )

    settings = proxy.state.settings
    from dataclasses import replace

    with run_proxy(replace(settings, mode=Mode.AUTO), environ={"CI": "true"}) as ci_proxy, \
            OpenAI(base_url=ci_proxy.url + "/v1", api_key="x", max_retries=0) as client:
        assert ci_proxy.state.mode is Mode.REPLAY
        client.chat.completions.create(**CHAT, seed=5)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**CHAT, seed=6)
    with run_proxy(replace(settings, mode=Mode.AUTO), environ={}) as dev_proxy:
        assert dev_proxy.state.mode is Mode.RECORD
    assert simulator.state.calls == 1


def test_changed_parameter_gives_replay_miss_naming_it(make_proxy: ProxyFactory,
                                                        simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT, seed=7, temperature=0.7)
    calls = simulator.state.calls
    changed = {**CHAT, "messages": [CHAT["messages"][0],
                                    {"role": "user", "content": "Name a fact about Venus."}]}
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(**changed, seed=7, temperature=0.8)
        retries = proxy.state.totals["misses"]
    error = caught.value
    assert error.status_code == 404
    assert error.code == "replay_miss" and error.type == "replay_miss"
    message = str(error.message)
    assert "cassette 'default'" in message and "chat/completions" in message
    assert 'messages[1].content: "Name a fact about Mars." -> "Name a fact about Venus."' in message
    assert "temperature: 0.7 -> 0.8" in message
    assert retries == 1, "the SDK must not retry a replay miss"
    assert simulator.state.calls == calls


def test_replay_miss_in_empty_cassette_says_so(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/c/fresh/v1",
                                                  api_key="x") as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.list()
    assert "cassette 'fresh'" in caught.value.message and "empty" in caught.value.message


async def test_async_clients_record_and_replay(make_proxy: ProxyFactory,
                                               simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        async with AsyncOpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY) as client:
            recorded = await asyncio.gather(*(client.chat.completions.create(**CHAT, seed=s)
                                              for s in range(4)))
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy:
        async with AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x") as client:
            replayed = await asyncio.gather(*(client.chat.completions.create(**CHAT, seed=s)
                                              for s in range(4)))
    assert replayed == recorded
    assert len({r.id for r in replayed}) == 4


def _azure(proxy_url: str, **kwargs: Any) -> AzureOpenAI:
    return AzureOpenAI(azure_endpoint=proxy_url, api_version="2024-10-21",
                       api_key=kwargs.pop("api_key", SECRET_KEY), **kwargs)


def test_azure_client_records_and_replays(make_proxy: ProxyFactory, cassettes: Path,
                                          simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, _azure(proxy.url) as client:
        chat = client.chat.completions.with_raw_response.create(**CHAT, seed=42)
        embedding = client.embeddings.create(model="embed-deployment", input="hi")
    assert simulator.state.last_headers["api-key"] == SECRET_KEY
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, _azure(proxy.url, api_key="dummy") as client:
        again = client.chat.completions.with_raw_response.create(**CHAT, seed=42)
        assert client.embeddings.create(model="embed-deployment", input="hi") == embedding
        with pytest.raises(openai.NotFoundError) as caught:
            with AzureOpenAI(azure_endpoint=proxy.url, api_version="2025-01-01-preview",
                             api_key="dummy") as other_version:
                other_version.chat.completions.create(**CHAT, seed=42)
    assert again.http_response.content == chat.http_response.content
    parsed = again.parse()
    assert parsed.model_extra is not None and "prompt_filter_results" in parsed.model_extra
    stored = next(cassettes.rglob("chat.completions-*.json")).read_text()
    assert '"deployment": "gpt-4o-mini"' in stored and '"api_version": "2024-10-21"' in stored
    assert "deployment gpt-4o-mini" in caught.value.message
    assert 'api_version: "2024-10-21" -> "2025-01-01-preview"' in caught.value.message


async def test_async_azure_client(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        async with AsyncAzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21",
                                    api_key=SECRET_KEY) as client:
            first = await client.chat.completions.create(**CHAT, seed=1)
            second = await client.chat.completions.create(**CHAT, seed=1)
    assert first == second


def test_azure_v1_route(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/openai/v1",
                                                  api_key=SECRET_KEY) as client:
        first = client.chat.completions.with_raw_response.create(**CHAT, seed=2)
        second = client.chat.completions.with_raw_response.create(**CHAT, seed=2)
    assert second.headers["x-replay-status"] == "hit"
    assert first.http_response.content == second.http_response.content


def test_cassette_selection_by_prefix_and_header(make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        with OpenAI(base_url=proxy.url + "/c/my-suite/v1", api_key=SECRET_KEY) as client:
            client.chat.completions.create(**CHAT, seed=1)
        with OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY,
                    default_headers={"X-Replay-Cassette": "other.suite"}) as client:
            client.chat.completions.create(**CHAT, seed=1)
        with OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY) as client:
            client.chat.completions.create(**CHAT, seed=1)
    names = sorted(p.parent.name for p in recorded_files(cassettes))
    assert names == ["default", "my-suite", "other.suite"]


def test_credentials_never_reach_the_store(make_proxy: ProxyFactory, cassettes: Path,
                                           simulator: SimulatorThread) -> None:
    simulator.state.api_key = "sk-the-real-key-is-different-000000"
    with make_proxy(Mode.RECORD, record_errors=True) as proxy:
        with OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, organization=ORG_ID,
                    project=PROJECT_ID, max_retries=0,
                    default_headers={"Cookie": "session=COOKIEVALUE123456"}) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                client.chat.completions.create(**CHAT, seed=1)
        assert "sk-" in caught.value.message  # the client still sees the upstream's message
        simulator.state.api_key = None
        with OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, organization=ORG_ID,
                    project=PROJECT_ID) as client:
            client.chat.completions.create(**CHAT, seed=2)
            client.embeddings.create(model="text-embedding-3-small", input=f"my key is {SECRET_KEY}")
    assert simulator.state.last_headers["openai-organization"] == ORG_ID
    everything = stored_bytes(cassettes)
    assert b"chat.completion" in everything and b"Incorrect API key" in everything
    for secret in (SECRET_KEY, SECRET_KEY[-12:], ORG_ID, PROJECT_ID, "COOKIEVALUE123456",
                   "org-simulatedorg1234", "proj_simulatedproject1", "simulatedcookievalue"):
        assert secret.encode() not in everything, secret
    assert b"sk-the" not in everything  # the upstream's masked echo of a key is scrubbed too


def test_proxy_key_replaces_client_key(make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    simulator.state.api_key = "sk-proxy-owned-upstream-key"
    with make_proxy(Mode.RECORD, openai_api_key="sk-proxy-owned-upstream-key") as proxy, \
            OpenAI(base_url=proxy.url + "/v1", api_key="dummy") as client:
        client.chat.completions.create(**CHAT, seed=1)
    assert simulator.state.last_headers["authorization"] == "Bearer sk-proxy-owned-upstream-key"


def test_sdk_volatile_headers_do_not_change_the_key(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        with OpenAI(base_url=proxy.url + "/v1", api_key="sk-one") as client:
            client.chat.completions.with_raw_response.create(**CHAT, seed=1)
        with OpenAI(base_url=proxy.url + "/v1", api_key="sk-two", default_headers={
                "X-Stainless-Retry-Count": "2", "User-Agent": "something/else"}) as client:
            second = client.chat.completions.with_raw_response.create(
                **CHAT, seed=1, user="someone", metadata={"run": "x"})
            beta = client.chat.completions.with_raw_response.create(
                **CHAT, seed=1, extra_headers={"OpenAI-Beta": "assistants=v2"})
    assert second.headers["x-replay-status"] == "hit"
    assert beta.headers["x-replay-status"] == "recorded"


def test_upstream_errors_pass_through_and_are_stored_only_when_asked(
        make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    assert not recorded_files(cassettes)
    with make_proxy(Mode.RECORD, record_errors=True) as proxy, OpenAI(
            base_url=proxy.url + "/v1", api_key=SECRET_KEY) as client:
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")
        with pytest.raises(openai.NotFoundError) as replayed:
            client.models.retrieve("no-such-model")
        assert replayed.value.response.headers["x-replay-status"] == "hit"
    assert len(recorded_files(cassettes)) == 1


def test_unknown_route_is_a_404_in_openai_shape(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.get(proxy.url + "/not-an-api")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_the_chosen_event_loop(tmp_path: Path, choice: str, expected: str) -> None:
    with run_proxy_process("--mode", "replay", "--cassettes", str(tmp_path),
                           "--loop", choice) as (url, _process):
        health = httpx2.get(url + "/_replay/health").json()
        assert health["loop"] == expected
        miss = httpx2.post(url + "/v1/chat/completions", json={"model": "m", "messages": []})
        assert miss.status_code == 404
        assert miss.json()["error"]["code"] == "replay_miss"


def test_an_unknown_event_loop_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["serve", "--loop", "trio"])
    assert result.exit_code == 2
    assert "--loop" in result.output


def test_a_repeated_request_is_answered_from_memory_without_keying(
        make_proxy: ProxyFactory) -> None:
    """The hot path: the same bytes again are a hit resolved before, counted as such."""
    import httpx2

    body = {"model": "gpt-4o-mini", "seed": 5, "messages": [{"role": "user", "content": "Hot?"}]}
    with make_proxy(Mode.RECORD) as proxy:
        answers = [httpx2.post(proxy.url + "/v1/chat/completions", json=body,
                               headers={"Authorization": "Bearer sk-x"}) for _ in range(3)]
        stats = httpx2.get(proxy.url + "/_replay/stats").json()["totals"]
    assert [a.headers["x-replay-status"] for a in answers] == ["recorded", "hit", "hit"]
    assert answers[1].content == answers[2].content == answers[0].content
    # The second request was keyed and found in the store; the third came from the hot cache.
    assert stats["hits"] == 2 and stats["hot_hits"] == 1
