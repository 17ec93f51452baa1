"""`verify` and `probe` against a real upstream: each reaches the URL the SDK would, with the
query encoded, as the proxy itself does."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory

CHAT = {"model": "gpt-4o-mini", "seed": 3,
        "messages": [{"role": "user", "content": "Name a colour."}]}
# Credentials come from the options only: nothing from the environment of the test run.
NO_KEYS = {"OPENAI_API_KEY": None, "REPLAY_PROXY_OPENAI_API_KEY": None,
           "AZURE_OPENAI_API_KEY": None, "REPLAY_PROXY_AZURE_OPENAI_API_KEY": None}


def _verify(cassettes: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["verify", "--cassettes", str(cassettes), *args],
                              env=NO_KEYS)


@pytest.fixture
def recorded(make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> Path:
    """A plain and a streamed chat answer, recorded with the key the simulator accepts."""
    simulator.state.api_key = SECRET_KEY
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
        list(client.chat.completions.create(**CHAT, stream=True))
    return cassettes


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
