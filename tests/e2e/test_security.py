"""The proxy is never an open relay for someone else's key."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import ProxyFactory, stored_bytes

CHAT = {"model": "gpt-4o-mini", "seed": 1, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_binding_off_loopback_requires_a_token(host: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--host", host, "--port", "1"])
    assert result.exit_code == 2
    assert "--auth-token" in result.output and "Refusing to bind" in result.output


def test_token_is_required_and_never_forwarded(make_proxy: ProxyFactory,
                                               simulator: SimulatorThread,
                                               cassettes: Path) -> None:
    token = "proxy-access-token-0123456789"
    simulator.state.api_key = "sk-upstream-owned-by-the-proxy"
    with make_proxy(Mode.RECORD, auth_token=token,
                    openai_api_key="sk-upstream-owned-by-the-proxy") as proxy:
        with OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                client.chat.completions.create(**CHAT)
            assert caught.value.code == "invalid_proxy_token"
        with OpenAI(base_url=proxy.url + "/v1", api_key=token) as client:
            assert client.chat.completions.create(**CHAT).choices
    assert simulator.state.calls == 1
    assert simulator.state.last_headers["authorization"] == "Bearer sk-upstream-owned-by-the-proxy"
    assert token.encode() not in stored_bytes(cassettes)


def test_without_an_upstream_key_the_token_is_not_passed_on(make_proxy: ProxyFactory,
                                                            simulator: SimulatorThread) -> None:
    token = "proxy-access-token-0123456789"
    with make_proxy(Mode.RECORD, auth_token=token) as proxy, \
            OpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**CHAT)  # the simulator got no key at all
    assert "authorization" not in simulator.state.last_headers


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


async def test_stores_never_run_code_from_what_they_load(tmp_path: Path) -> None:
    import diskcache
    import orjson
    from replay_proxy.core.errors import CassetteError
    from replay_proxy.store import open_store

    marker = tmp_path / "pwned"
    cache = diskcache.Cache(str(tmp_path / "cache"))
    cache.set(f"default\x1f{'a' * 64}", _Exploit(marker))
    cache.close()
    store = open_store(f"diskcache:{tmp_path / 'cache'}")
    with pytest.raises(CassetteError, match="pickle"):
        await store.get("default", "a" * 64, "chat.completions")
    await store.close()
    assert not marker.exists()

    folder = tmp_path / "cassettes" / "default"
    folder.mkdir(parents=True)
    (folder / f"chat.completions-{'b' * 64}.json").write_text(
        "!!python/object/apply:os.system ['touch " + str(marker) + "']")
    (folder / f"chat.completions-{'c' * 64}.json").write_bytes(orjson.dumps(
        {"format": 1, "key": "c" * 64, "request": {"__reduce__": "os.system"},
         "recordings": [{"status": 200, "headers": {}, "body_encoding": "pickle",
                         "body": "gASV"}]}))
    directory = open_store(tmp_path / "cassettes")
    for key in ("b" * 64, "c" * 64):
        with pytest.raises(CassetteError):
            await directory.get("default", key, "chat.completions")
    assert not marker.exists()
