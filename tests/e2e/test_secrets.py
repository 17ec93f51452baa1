"""Secrets never reach disk or logs, even when the upstream echoes them back.

The upstream here is hostile on purpose (the simulator is not): it quotes the key it was sent
in its answers, in a 401, and in a stream's error event. Every store is searched byte by byte,
with the usage log, the run counters and the proxy's log output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner
from openai import AzureOpenAI, OpenAI
from replay_proxy.core.canonical import KeyPolicy
from replay_proxy.core.modes import Mode
from replay_proxy.core.rules import Rules
from replay_proxy.core.scrub import REDACTED
from replay_proxy.core.settings import Settings
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import ServerThread, run_proxy, run_proxy_process

from tests.conftest import SECRET_KEY, stored_bytes

# The proxy's own credentials: not shaped like any known key, so only their exact values can
# keep them out of the store.
PROXY_OPENAI_KEY = "upstream-openai-key-held-by-the-proxy-4b1f"
PROXY_AZURE_KEY = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
AUTH_TOKEN = "proxy-access-token-kept-private-8c2d"
API_VERSION = "2024-10-21"


def _presented(request: web.Request) -> str:
    return request.headers.get("api-key") or \
        request.headers.get("Authorization", "").removeprefix("Bearer ")


def _chunk(content: str) -> dict[str, Any]:
    return {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 1,
            "model": "echo", "choices": [{"index": 0, "delta": {"content": content},
                                          "finish_reason": None}]}


def _escaped(payload: Any, secret: str) -> bytes:
    """JSON whose copy of `secret` is written with \\u escapes: the same text once decoded."""
    escape = "".join(f"\\u{ord(char):04x}" for char in secret).encode()
    return orjson.dumps(payload).replace(secret.encode(), escape)


_CALLS = web.AppKey("calls", list[int])
CONTACT = "help.desk@example.com"  # what a --redact email rule removes from stored answers


async def _echo(request: web.Request) -> web.StreamResponse:
    """Answer by quoting the credential the request carried, as the request's model asks:
    `reject` (a 401), `echo-plain` (whole), `echo-split` (streamed four characters per event),
    `echo-escaped` (JSON-escaped), `echo-counted` (whole, numbered: each answer differs)."""
    key = _presented(request)
    body = await request.json()
    style = body["model"]
    said = body["messages"][-1]["content"]
    if style == "reject":
        return web.json_response({"error": {"message": f"Incorrect API key provided: {key}.",
                                            "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, status=401)
    text = f"You sent {key} and said: {said}"
    if style == "echo-counted":
        calls = request.app[_CALLS]
        calls.append(len(calls) + 1)
        text += f" (answer {calls[-1]}; write to {CONTACT})"
    if not body.get("stream"):
        payload = {"id": "chatcmpl-echo", "object": "chat.completion", "created": 1,
                   "model": "echo", "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": text}}]}
        raw = _escaped(payload, key) if style == "echo-escaped" else orjson.dumps(payload)
        return web.Response(body=raw, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    size = 4 if style == "echo-split" else len(text)
    for start in range(0, len(text), size):
        data = _chunk(text[start:start + size])
        raw = _escaped(data, key) if style == "echo-escaped" else orjson.dumps(data)
        await response.write(b"data: " + raw + b"\n\n")
    error = {"error": {"message": f"The key {key} is over its quota."}}
    raw = _escaped(error, key) if style == "echo-escaped" else orjson.dumps(error)
    await response.write(b"event: error\ndata: " + raw + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _echo_app() -> web.Application:
    app = web.Application()
    app[_CALLS] = []
    app.router.add_post("/v1/chat/completions", _echo)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", _echo)
    return app


@pytest.fixture
def echo() -> Iterator[ServerThread]:
    server = ServerThread(lambda: web.AppRunner(_echo_app(), shutdown_timeout=1.0)).start()
    yield server
    server.stop()


def redis_bytes(url: str) -> bytes:
    """Every value held in the Redis database, read as plain bytes (DUMP may compress)."""
    import redis

    client = redis.Redis.from_url(url)
    found: list[bytes] = []
    try:
        for name in client.scan_iter():
            found.append(name)
            kind = client.type(name)
            if kind == b"string":
                found.append(client.get(name) or b"")
            elif kind == b"set":
                found += client.smembers(name)
            elif kind == b"hash":
                for field, value in client.hgetall(name).items():
                    found += [field, value]
            elif kind == b"list":
                found += client.lrange(name, 0, -1)
            elif kind == b"zset":
                found += client.zrange(name, 0, -1)
    finally:
        client.close()
    return b"\x00".join(found)


@pytest.fixture(params=["directory", "diskcache", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    if request.param == "directory":
        return None
    if request.param == "diskcache":
        return f"diskcache:{tmp_path / 'cache'}"
    url: str = request.getfixturevalue("redis_url")
    return url


def everything_kept(tmp_path: Path, store: str | None) -> bytes:
    """The cassettes, the state folder beside them, a diskcache, and Redis."""
    kept = stored_bytes(tmp_path)
    if store is not None and store.startswith("redis://"):
        kept += redis_bytes(store)
    return kept


def proxy_log(caplog: pytest.LogCaptureFixture) -> bytes:
    """What the proxy (and the aiohttp server under it) logged; the SDK's own debug log, which
    quotes the requests it sends, is the client's business."""
    formatter = logging.Formatter()
    return "\n".join(formatter.format(record) for record in caplog.records
                     if record.name.startswith(("replay_proxy", "aiohttp"))).encode()


def forms(secret: str) -> list[bytes]:
    """A secret as it could be stored: plain, JSON-escaped (once, or twice for a text body
    inside a cassette file), and its longer pieces."""
    escaped = "".join(f"\\u{ord(char):04x}" for char in secret)
    return [secret.encode(), escaped.encode(), escaped.replace("\\", "\\\\").encode(),
            secret[:12].encode(), secret[-12:].encode()]


def _chat(client: OpenAI, style: str, said: str = "hello") -> str:
    messages = [{"role": "user", "content": said}]
    answer = client.chat.completions.create(model=style, messages=messages)  # type: ignore
    text = answer.choices[0].message.content or ""
    stream = client.chat.completions.create(model=style, messages=messages,  # type: ignore
                                            stream=True)
    pieces = []
    with pytest.raises(openai.APIError) as caught:  # the SDK raises at the error event
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
    return f"{text}|{''.join(pieces)}|{caught.value.message}"


def _settings(tmp_path: Path, store: str | None, upstream: str, mode: Mode) -> Settings:
    return Settings(cassettes=tmp_path / "cassettes", store=store, mode=mode,
                    openai_upstream=upstream, azure_upstream=upstream,
                    openai_api_key=PROXY_OPENAI_KEY, azure_api_key=PROXY_AZURE_KEY,
                    auth_token=AUTH_TOKEN, record_errors=True)


def _exercise(proxy_url: str, styles: tuple[str, ...]) -> list[str]:
    """Plain and streamed answers of each style on both providers, and a 401, through the SDK."""
    answers = []
    with OpenAI(base_url=proxy_url + "/v1", api_key=AUTH_TOKEN, max_retries=0) as client, \
            AzureOpenAI(azure_endpoint=proxy_url, api_version=API_VERSION, api_key=AUTH_TOKEN,
                        max_retries=0) as azure:
        for style in styles:
            answers.append(_chat(client, style, said=f"the token is {AUTH_TOKEN}"))
            answers.append(_chat(azure, style))
        for sdk in (client, azure):
            with pytest.raises(openai.AuthenticationError) as caught:
                sdk.chat.completions.create(model="reject",
                                            messages=[{"role": "user", "content": "hi"}])
            answers.append(str(caught.value.message))
    return answers


SECRETS = (PROXY_OPENAI_KEY, PROXY_AZURE_KEY, AUTH_TOKEN)


def test_the_proxys_own_keys_never_reach_a_store_or_a_log(
        echo: ServerThread, tmp_path: Path, store_spec: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    recording = _settings(tmp_path, store_spec, echo.url, Mode.RECORD)
    with run_proxy(recording) as proxy:
        live = _exercise(proxy.url, ("echo-plain",))
    # The client got the answers as they were given, the proxy's key included.
    plain, streamed, error_event = live[0].split("|")
    assert PROXY_OPENAI_KEY in plain and PROXY_OPENAI_KEY in streamed and AUTH_TOKEN in plain
    assert PROXY_OPENAI_KEY in error_event and PROXY_AZURE_KEY in live[1]
    assert PROXY_OPENAI_KEY in live[2]
    with run_proxy(_settings(tmp_path, store_spec, echo.url, Mode.REPLAY)) as proxy:
        replayed = _exercise(proxy.url, ("echo-plain",))
        assert proxy.state.totals["hits"] == 6 and proxy.state.totals["misses"] == 0
    assert "[REDACTED]" in replayed[0] and "[REDACTED]" in replayed[2]
    kept = everything_kept(tmp_path, store_spec) + proxy_log(caplog)
    assert b"You sent [REDACTED]" in kept
    for secret in SECRETS:
        for form in forms(secret):
            assert form not in kept, (secret, form)
        assert all(secret not in answer for answer in replayed)


def test_a_serve_process_keeps_its_keys_out_of_its_log_and_store(echo: ServerThread,
                                                                tmp_path: Path) -> None:
    cassettes = tmp_path / "cassettes"
    with run_proxy_process("--mode", "record", "--record-errors", "--cassettes", str(cassettes),
                           "--openai-upstream", echo.url, "--azure-upstream", echo.url,
                           "--auth-token", AUTH_TOKEN,
                           env={"OPENAI_API_KEY": PROXY_OPENAI_KEY,
                                "AZURE_OPENAI_API_KEY": PROXY_AZURE_KEY}) as (url, process):
        _exercise(url, ("echo-plain",))
        process.terminate()
        _, log = process.communicate(timeout=20)
    kept = stored_bytes(tmp_path) + log
    assert b"You sent [REDACTED]" in kept
    for secret in SECRETS:
        for form in forms(secret):
            assert form not in kept, (secret, form)


def test_the_clients_key_is_scrubbed_as_before(echo: ServerThread, tmp_path: Path) -> None:
    settings = Settings(cassettes=tmp_path / "cassettes", mode=Mode.RECORD,
                        openai_upstream=echo.url, record_errors=True)
    with run_proxy(settings) as proxy, OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY,
                                              max_retries=0) as client:
        assert SECRET_KEY in _chat(client, "echo-plain")
    kept = stored_bytes(tmp_path)
    assert b"You sent [REDACTED]" in kept
    for form in forms(SECRET_KEY):
        assert form not in kept


def test_split_and_escaped_secrets_cannot_be_rebuilt_from_a_store(
        echo: ServerThread, tmp_path: Path, store_spec: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    styles = ("echo-split", "echo-escaped")
    with run_proxy(_settings(tmp_path, store_spec, echo.url, Mode.RECORD)) as proxy:
        live = _exercise(proxy.url, styles)
    assert live[0].split("|")[1].startswith(f"You sent {PROXY_OPENAI_KEY}")  # as it was sent
    with run_proxy(_settings(tmp_path, store_spec, echo.url, Mode.REPLAY)) as proxy:
        replayed = _exercise(proxy.url, styles)
        assert proxy.state.totals["misses"] == 0
    for answer in replayed[:4]:  # what the SDK assembles: the scrubbed text, nothing else
        for part in answer.split("|"):
            assert part.startswith((f"You sent {REDACTED}", f"The key {REDACTED} is")), part
    kept = everything_kept(tmp_path, store_spec) + proxy_log(caplog)
    for secret in SECRETS:
        for form in forms(secret):
            assert form not in kept, (secret, form)
        assert all(secret not in answer for answer in replayed)


def test_the_clients_key_streamed_in_pieces_is_not_stored(echo: ServerThread,
                                                          tmp_path: Path) -> None:
    settings = Settings(cassettes=tmp_path / "cassettes", mode=Mode.RECORD,
                        openai_upstream=echo.url)
    with run_proxy(settings) as proxy, OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY,
                                              max_retries=0) as client:
        assert SECRET_KEY in _chat(client, "echo-split")
        assert SECRET_KEY in _chat(client, "echo-escaped")
    with run_proxy(replace(settings, mode=Mode.REPLAY)) as proxy, \
            OpenAI(base_url=proxy.url + "/v1", api_key="replay-needs-no-key") as client:
        for style in ("echo-split", "echo-escaped"):
            assert _chat(client, style).split("|") == [
                f"You sent {REDACTED} and said: hello"] * 2 + [f"The key {REDACTED} is over "
                                                               "its quota."]
    kept = stored_bytes(tmp_path)
    for form in forms(SECRET_KEY):
        assert form not in kept


# A key given to `verify`: not shaped like any known key, so only its exact value can keep it
# out of what `verify --update` stores.
VERIFY_KEY = "verify-run-key-without-a-known-shape-5e1d"


def test_verify_update_stores_the_drifted_answer_scrubbed(echo: ServerThread,
                                                          tmp_path: Path) -> None:
    cassettes = tmp_path / "cassettes"
    settings = Settings(cassettes=cassettes, mode=Mode.RECORD, openai_upstream=echo.url)
    with run_proxy(settings) as proxy, OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY,
                                              max_retries=0) as client:
        client.chat.completions.create(model="echo-counted",  # type: ignore[arg-type]
                                       messages=[{"role": "user", "content": "hello"}])
    result = CliRunner().invoke(main, ["verify", "--cassettes", str(cassettes), "--update",
                                       "--openai-upstream", echo.url, "--openai-api-key",
                                       VERIFY_KEY], env={"OPENAI_API_KEY": None})
    assert result.exit_code == 1, result.output  # answer 2 is not answer 1
    assert "drift:output" in result.output and "drift stored" in result.output
    kept = stored_bytes(tmp_path)
    assert b"You sent [REDACTED] and said: hello (answer 2; " in kept
    for form in forms(VERIFY_KEY):
        assert form not in kept, form
    assert VERIFY_KEY not in result.output


def test_verify_update_applies_the_redaction_rules_of_the_configuration(
        echo: ServerThread, tmp_path: Path) -> None:
    cassettes = tmp_path / "cassettes"
    config = tmp_path / "replay-proxy.toml"
    config.write_text('redact = ["email"]\n')
    rules = Rules.parse(redactions=("email",))
    settings = Settings(cassettes=cassettes, mode=Mode.RECORD, openai_upstream=echo.url,
                        key_policy=KeyPolicy.build(rules=rules))
    with run_proxy(settings) as proxy, OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY,
                                              max_retries=0) as client:
        live = client.chat.completions.create(model="echo-counted",  # type: ignore[arg-type]
                                              messages=[{"role": "user", "content": "hi"}])
    assert CONTACT in (live.choices[0].message.content or "")
    result = CliRunner().invoke(main, ["--config", str(config), "verify", "--update",
                                       "--cassettes", str(cassettes), "--openai-upstream",
                                       echo.url, "--openai-api-key", VERIFY_KEY],
                                env={"OPENAI_API_KEY": None})
    assert result.exit_code == 1 and "drift stored" in result.output, result.output
    kept = stored_bytes(cassettes)
    assert b"(answer 1; write to [REDACTED])" in kept and b"(answer 2; write to [REDACTED])" in kept
    assert CONTACT.encode() not in kept
