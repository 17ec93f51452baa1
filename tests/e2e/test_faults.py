"""Upstream faults: a clear error for the client, the proxy keeps serving, nothing stored."""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

CHAT = {"model": "gpt-4o-mini", "seed": 1, "messages": [{"role": "user", "content": "Hi"}]}


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=SECRET_KEY, max_retries=0, timeout=10)


@pytest.mark.parametrize("record_errors", [False, True])
@pytest.mark.parametrize(("fault", "error", "status"), [
    ("status:500", openai.InternalServerError, 500),
    ("status:429", openai.RateLimitError, 429),
    ("status:503", openai.InternalServerError, 503),
])
def test_upstream_error_statuses_pass_through_and_are_never_stored(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path, fault: str,
        error: type[Exception], status: int, record_errors: bool) -> None:
    simulator.state.faults = [fault]
    with make_proxy(Mode.RECORD, record_errors=record_errors) as proxy, \
            _client(proxy.url) as client:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**CHAT)
        assert caught.value.status_code == status  # type: ignore[attr-defined]
        assert caught.value.response.headers["x-replay-status"] == "passthrough"  # type: ignore
        assert recorded_files(cassettes) == []
        assert client.chat.completions.create(**CHAT).choices  # still serving, now recorded
    assert len(recorded_files(cassettes)) == 1


def test_upstream_timeout_is_a_504(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                   cassettes: Path) -> None:
    simulator.state.faults = ["hang:3"]
    with make_proxy(Mode.RECORD, upstream_timeout=0.5, record_errors=True) as proxy, \
            _client(proxy.url) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**CHAT)
        assert caught.value.status_code == 504
        body = caught.value.response.json()
        assert body["error"]["code"] == "upstream_timeout"
        assert simulator.url.replace("http://", "") in body["error"]["message"]
        assert recorded_files(cassettes) == []
        assert client.models.list().data


def test_connection_refused_is_a_502_naming_the_upstream(make_proxy: ProxyFactory,
                                                         simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, _client(proxy.url) as client:
        simulator.stop()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**CHAT)
        assert caught.value.status_code == 502
        error = caught.value.response.json()["error"]
        assert error["code"] == "upstream_unreachable" and "--openai-upstream" in error["message"]
        # A network blip while recording is worth a retry, as against the real API.
        assert caught.value.response.headers["x-should-retry"] == "true"
        assert httpx2.get(proxy.url + "/_replay/health").json()["status"] == "ok"


@pytest.mark.parametrize("fault", ["reset", "reset_body"])
def test_connection_reset_is_a_502_and_stores_nothing(make_proxy: ProxyFactory,
                                                      simulator: SimulatorThread,
                                                      cassettes: Path, fault: str) -> None:
    simulator.state.faults = [fault]
    with make_proxy(Mode.RECORD, record_errors=True) as proxy, _client(proxy.url) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**CHAT)
        assert caught.value.status_code == 502
        assert recorded_files(cassettes) == []
        assert client.chat.completions.create(**CHAT).choices
    assert len(recorded_files(cassettes)) == 1


def test_reset_mid_stream_stores_nothing(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                         cassettes: Path) -> None:
    simulator.state.faults = ["cut:2"]
    with make_proxy(Mode.RECORD, record_errors=True) as proxy, _client(proxy.url) as client:
        with pytest.raises((httpx2.HTTPError, openai.APIError)):
            list(client.chat.completions.create(**CHAT, stream=True))
        assert recorded_files(cassettes) == []
        assert list(client.chat.completions.create(**CHAT, stream=True))
    assert len(recorded_files(cassettes)) == 1


def test_client_disconnect_mid_stream_stores_nothing(make_proxy: ProxyFactory,
                                                     simulator: SimulatorThread,
                                                     cassettes: Path) -> None:
    simulator.state.event_delay = 0.05
    with make_proxy(Mode.RECORD) as proxy:
        with httpx2.stream("POST", proxy.url + "/v1/chat/completions",
                           json={**CHAT, "stream": True},
                           headers={"Authorization": "Bearer sk-x"}) as response:
            for _ in response.iter_raw():
                break  # read the first chunk, then hang up
        import time

        time.sleep(1.2)
        assert recorded_files(cassettes) == []
        assert httpx2.get(proxy.url + "/_replay/health").status_code == 200


@pytest.mark.parametrize("fault", ["reset", "hang:2"])
def test_a_transient_upstream_fault_is_retried_by_the_sdk_and_recorded(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path,
        fault: str) -> None:
    simulator.state.faults = [fault]  # one-shot: the retry finds a healthy upstream
    with make_proxy(Mode.RECORD, upstream_timeout=0.5) as proxy, \
            OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, timeout=10) as client:
        assert client.max_retries == 2  # the SDK's default
        assert client.chat.completions.create(**CHAT).choices
        stats = httpx2.get(proxy.url + "/_replay/stats").json()["totals"]
    assert simulator.state.calls == 2
    assert stats["recorded"] == 1
    assert len(recorded_files(cassettes)) == 1


def test_a_replay_miss_is_not_retried(make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.REPLAY) as proxy, \
            OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, timeout=10) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(**CHAT)
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert httpx2.get(proxy.url + "/_replay/stats").json()["totals"]["misses"] == 1
