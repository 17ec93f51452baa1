"""`verify` and `probe` against a real upstream. `verify` re-sends recordings: an answer it
cannot compare is an error, never drift, and never stored; it reaches the URL the SDK would; a
run that verified nothing fails. `probe` takes its base URL as the SDK does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from openai import AzureOpenAI, OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import ServerThread, SimulatorThread, free_port

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

CHAT = {"model": "gpt-4o-mini", "seed": 3,
        "messages": [{"role": "user", "content": "Name a colour."}]}
WRONG_KEY = "sk-proj-WRONGkeyForVerify0000000000000000000000"
# Credentials come from the options only: nothing from the environment of the test run.
NO_KEYS = {"OPENAI_API_KEY": None, "REPLAY_PROXY_OPENAI_API_KEY": None,
           "AZURE_OPENAI_API_KEY": None, "REPLAY_PROXY_AZURE_OPENAI_API_KEY": None}


def _verify(cassettes: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["verify", "--cassettes", str(cassettes), *args],
                              env=NO_KEYS)


def _snapshot(cassettes: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in recorded_files(cassettes)}


@pytest.fixture
def recorded(make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> Path:
    """A plain and a streamed chat answer, recorded with the key the simulator accepts."""
    simulator.state.api_key = SECRET_KEY
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
        list(client.chat.completions.create(**CHAT, stream=True))
    return cassettes


@pytest.mark.parametrize("key", [None, WRONG_KEY], ids=["no key", "wrong key"])
def test_a_refused_key_is_an_error_not_drift_and_nothing_is_stored(
        recorded: Path, simulator: SimulatorThread, key: str | None) -> None:
    before = _snapshot(recorded)
    given = ["--openai-api-key", key] if key else []
    for extra in ([], ["--update"]):
        result = _verify(recorded, "--openai-upstream", simulator.url, *given, *extra)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if "chat/completions" in line]
        assert len(lines) == 2 and all(line.startswith("error") for line in lines), result.output
        assert "drift" not in result.output
        assert "status 401" in result.output
        assert "--openai-api-key" in result.output and "OPENAI_API_KEY" in result.output
        assert "2 key(s) could not be verified" in result.output
        assert WRONG_KEY not in result.output
    assert _snapshot(recorded) == before  # --update stored no 401
    drift = CliRunner().invoke(main, ["drift", "--cassettes", str(recorded)])
    assert drift.exit_code == 0 and "no drift recorded" in drift.output
    rows = orjson.loads(_verify(recorded, "--openai-upstream", simulator.url, *given,
                                "--json").stdout)
    assert [row["result"] for row in rows] == ["error", "error"]
    assert all("401" in row["detail"] for row in rows)


def test_the_right_key_verifies(recorded: Path, simulator: SimulatorThread) -> None:
    result = _verify(recorded, "--openai-upstream", simulator.url, "--openai-api-key",
                     SECRET_KEY)
    assert result.exit_code == 0, result.output
    assert "summary: 2 same" in result.output


def test_a_base_url_with_v1_reaches_the_same_route(recorded: Path,
                                                   simulator: SimulatorThread) -> None:
    """`--openai-upstream https://api.openai.com/v1`, as OPENAI_BASE_URL is spelled."""
    calls = simulator.state.calls_by_endpoint.copy()
    result = _verify(recorded, "--openai-upstream", simulator.url + "/v1/",
                     "--openai-api-key", SECRET_KEY)
    assert result.exit_code == 0, result.output
    assert "summary: 2 same" in result.output
    assert simulator.state.calls_by_endpoint["POST chat/completions"] == \
        calls["POST chat/completions"] + 2


def test_a_server_error_and_a_cut_stream_are_errors(recorded: Path,
                                                    simulator: SimulatorThread) -> None:
    before = _snapshot(recorded)
    # Keys are re-sent in the order they are listed (one at a time here): the stream's call
    # is cut after two events, the other answered with a 500.
    simulator.state.faults = ["cut:2" if b'"events"' in path.read_bytes() else "status:500"
                              for path in recorded_files(recorded)]
    result = _verify(recorded, "--openai-upstream", simulator.url, "--openai-api-key",
                     SECRET_KEY, "--concurrency", "1", "--update", "--json")
    assert result.exit_code == 2, result.output
    rows = orjson.loads(result.stdout)
    assert [row["result"] for row in rows] == ["error", "error"]
    details = " ".join(row["detail"] for row in rows)
    assert "status 500" in details and "try again" in details
    assert "stream" in details and "cut" in details
    assert _snapshot(recorded) == before


async def _login_page(_request: web.Request) -> web.Response:
    return web.Response(text="<html><body>Sign in to continue</body></html>",
                        content_type="text/html")


@pytest.fixture
def not_the_api() -> Iterator[ServerThread]:
    """A server that answers 200 with a web page, as a corporate proxy's login page does."""

    def make() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _login_page)
        return web.AppRunner(app, shutdown_timeout=1.0)

    server = ServerThread(make).start()
    yield server
    server.stop()


def test_an_answer_that_is_not_the_api_is_an_error(recorded: Path,
                                                   not_the_api: ServerThread) -> None:
    before = _snapshot(recorded)
    result = _verify(recorded, "--openai-upstream", not_the_api.url, "--openai-api-key",
                     SECRET_KEY, "--update")
    assert result.exit_code == 2, result.output
    verdicts = [line.split()[0] for line in result.stdout.splitlines() if "/" in line[:40]]
    assert verdicts == ["error", "error"] and "drift" not in result.output
    assert "text/html" in result.output and "--openai-upstream" in result.output
    assert _snapshot(recorded) == before


def test_the_query_reaches_the_upstream_encoded(make_proxy: ProxyFactory,
                                                cassettes: Path) -> None:
    """A query value holding `&`, `=` and a space arrives as it was recorded: the proxy in
    replay mode, as the upstream, answers only a request that keys the same."""
    query = {"note": "a b&c=d", "after": "x/y?z"}
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.models.list(extra_query=query)
    with make_proxy(Mode.REPLAY) as replaying:
        result = _verify(cassettes, "--openai-upstream", replaying.url, "--openai-api-key",
                         SECRET_KEY)
        assert replaying.state.totals["hits"] == 1, result.output
    assert result.exit_code == 0, result.output
    assert "summary: 1 same" in result.output


def test_a_run_that_verified_nothing_fails(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                           cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.files.list()  # stateful: re-sending it could change a resource upstream
    result = _verify(cassettes, "--openai-upstream", simulator.url, "--openai-api-key",
                     SECRET_KEY)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("skipped")
    assert "Nothing was verified: every key (1) was skipped" in result.output
    empty = cassettes.parent / "empty"
    empty.mkdir()
    result = _verify(empty, "--openai-upstream", simulator.url, "--openai-api-key", SECRET_KEY)
    assert result.exit_code == 2 and "Nothing was verified: no recordings in" in result.output


@pytest.mark.parametrize("path", ["/v1", "/openai/deployments/gpt-4o-mini?api-version=2024-10-21"],
                         ids=["openai", "azure"])
def test_probe_takes_a_base_url_as_the_sdk_does(simulator: SimulatorThread, path: str) -> None:
    """The base URL, query included, as OPENAI_BASE_URL or an Azure deployment's URL."""
    simulator.state.api_key = SECRET_KEY
    result = CliRunner().invoke(main, [
        "probe", "--base-url", simulator.url + path, "--api-key", SECRET_KEY, "--model",
        "gpt-4o-mini", "--prompt", "Write a haiku.", "-n", "2", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["distinct_outputs"] == 1
    provider = "azure" if "openai/" in path else "openai"
    assert simulator.state.last_headers.get("api-key" if provider == "azure"
                                            else "authorization", "").endswith(SECRET_KEY)


def test_an_unreachable_upstream_is_an_error(recorded: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = _verify(recorded, "--openai-upstream", nowhere, "--openai-api-key", SECRET_KEY)
    assert result.exit_code == 2, result.output
    assert result.output.count(f"Could not reach the upstream {nowhere}") == 2


def test_azure_keys_go_to_the_azure_upstream_with_its_key(make_proxy: ProxyFactory,
                                                         simulator: SimulatorThread,
                                                         cassettes: Path) -> None:
    simulator.state.api_key = SECRET_KEY
    with make_proxy(Mode.RECORD) as proxy, AzureOpenAI(
            azure_endpoint=proxy.url, api_key=SECRET_KEY, api_version="2024-10-21") as client:
        client.chat.completions.create(**CHAT)  # type: ignore[arg-type]
    skipped = _verify(cassettes, "--openai-upstream", simulator.url)
    assert skipped.exit_code == 2 and "no --azure-upstream given" in skipped.output
    verified = _verify(cassettes, "--azure-upstream", simulator.url, "--azure-api-key",
                       SECRET_KEY)
    assert verified.exit_code == 0 and "summary: 1 same" in verified.output, verified.output
    assert simulator.state.last_headers["api-key"] == SECRET_KEY
