"""Credentials in the query string (`?api-key=...`, as Azure and API Management accept them)
reach the upstream and nothing else: not the key, the stored request, a miss message, the
usage log, the run counters or the proxy's log, in any store. An upstream that quotes the key
back has it scrubbed from the stored answer, as for a key sent in a header."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web
from openai import AzureOpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.tools.testing import ServerThread, run_proxy

from tests.e2e.test_secrets import everything_kept, forms, proxy_log, store_spec

__all__ = ["store_spec"]  # the fixture: every store, one test each

QUERY_KEY = "azq-QUERYSECRETkey-4d7e1c9a0b2f"
QUERY_SUBSCRIPTION = "apim-SUBSCRIPTIONsecret-77e0a1"
API_VERSION = "2024-10-21"
RECEIVED = web.AppKey("received", list)


async def _chat(request: web.Request) -> web.Response:
    """Quote the query's key back in the answer, as a careless upstream might."""
    request.app[RECEIVED].append(dict(request.query))
    body = await request.json()
    said = body["messages"][-1]["content"]
    return web.json_response({
        "id": "chatcmpl-q", "object": "chat.completion", "created": 1, "model": "echo",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant",
            "content": f"key {request.query.get('api-key')} said {said}"}}]})


@pytest.fixture
def upstream() -> Iterator[ServerThread]:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", _chat)
    # No access log: it is the upstream's, and it would quote the query it was sent.
    server = ServerThread(lambda: web.AppRunner(app, access_log=None,
                                                shutdown_timeout=1.0)).start()
    server.app = app  # type: ignore[attr-defined]
    yield server
    server.stop()


def _client(proxy_url: str, **query: str) -> AzureOpenAI:
    return AzureOpenAI(azure_endpoint=proxy_url, api_version=API_VERSION,
                       api_key="header-key-not-a-secret-here", max_retries=0,
                       default_query={"api-key": QUERY_KEY,
                                      "subscription-key": QUERY_SUBSCRIPTION, **query})


def _ask(client: AzureOpenAI, said: str) -> str:
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": said}], seed=1)
    return answer.choices[0].message.content or ""


def test_query_credentials_are_forwarded_and_never_kept(
        upstream: ServerThread, tmp_path: Path, store_spec: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(cassettes=tmp_path / "cassettes", store=store_spec, mode=Mode.RECORD,
                        azure_upstream=upstream.url)
    with run_proxy(settings) as proxy, _client(proxy.url) as client:
        assert _ask(client, "hello") == f"key {QUERY_KEY} said hello"  # the live answer
    assert proxy.state.totals["recorded"] == 1  # its counters and usage flushed at the stop
    received = upstream.app[RECEIVED]  # type: ignore[attr-defined]
    assert received[0]["api-key"] == QUERY_KEY
    assert received[0]["subscription-key"] == QUERY_SUBSCRIPTION
    assert received[0]["api-version"] == API_VERSION

    replaying = Settings(cassettes=tmp_path / "cassettes", store=store_spec, mode=Mode.REPLAY,
                         azure_upstream=upstream.url)
    # Another key in the query: the same recording, since credentials are no part of a key.
    with run_proxy(replaying) as proxy, _client(proxy.url, **{"api-key": "other-key-9"}) as other:
        assert _ask(other, "hello") == "key [REDACTED] said hello"
        with _client(proxy.url) as client, pytest.raises(openai.NotFoundError) as caught:
            _ask(client, "goodbye")
        miss = str(caught.value)
        assert "Replay miss" in miss and "goodbye" in miss
        assert proxy.state.totals["hits"] == 1
    assert len(received) == 1  # replay never went upstream

    kept = everything_kept(tmp_path, store_spec) + proxy_log(caplog) + miss.encode()
    assert b"said hello" in kept  # the search below looks where the answer is
    assert b".replay-proxy" in b"".join(str(p).encode() for p in tmp_path.rglob("*.json"))
    for secret in (QUERY_KEY, QUERY_SUBSCRIPTION):
        for form in forms(secret):
            assert form not in kept, (secret, form, kept[max(0, kept.find(form) - 300):kept.find(form) + 60])


def test_with_an_access_token_query_credentials_stay_in_the_proxy(
        upstream: ServerThread, tmp_path: Path) -> None:
    """Behind --auth-token the client's credentials are the proxy's token: never passed on."""
    settings = Settings(cassettes=tmp_path / "cassettes", mode=Mode.RECORD,
                        azure_upstream=upstream.url, azure_api_key="proxy-owned-azure-key",
                        auth_token="proxy-token-0123456789")
    with run_proxy(settings) as proxy, AzureOpenAI(
            azure_endpoint=proxy.url, api_version=API_VERSION, api_key="proxy-token-0123456789",
            max_retries=0, default_query={"api-key": "proxy-token-0123456789"}) as client:
        assert _ask(client, "hi") == "key None said hi"
    received = upstream.app[RECEIVED]  # type: ignore[attr-defined]
    assert received == [{"api-version": API_VERSION}]
