"""Redis over TLS with a client certificate, a user and a password: the proxy records and
replays through it, and the password is never shown: not in a log line, `/_replay/health`,
`/_replay/stats`, an error message, the run files beside the cassettes, nor in Redis."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

import httpx2
import pytest
import redis
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.store import describe_store, open_store
from replay_proxy.tools.testing import SimulatorThread, TlsFiles, run_proxy, run_proxy_process

from tests.conftest import REDIS_PASSWORD, stored_bytes

CHAT = {"model": "gpt-4o-mini", "seed": 5, "messages": [{"role": "user", "content": "TLS?"}]}
SPELLINGS = (REDIS_PASSWORD.encode(), quote(REDIS_PASSWORD, safe="").encode())


def assert_no_password(where: str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for spelling in SPELLINGS:
        assert spelling not in raw, f"the Redis password is in {where}"


def redis_bytes(url: str) -> bytes:
    client = redis.Redis.from_url(url)
    try:
        return b"".join(name + (client.dump(name) or b"") for name in client.scan_iter())
    finally:
        client.close()


def test_record_and_replay_over_tls_without_ever_showing_the_password(
        redis_tls_url: str, simulator: SimulatorThread, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cassettes = tmp_path / "cassettes"
    seen: list[bytes] = []
    settings = Settings(cassettes=cassettes, store=redis_tls_url, mode=Mode.RECORD,
                        openai_upstream=simulator.url)
    with run_proxy(settings) as proxy, \
            OpenAI(base_url=proxy.url + "/c/tls/v1", api_key="sk-x") as client:
        recorded = client.chat.completions.create(**CHAT)
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        assert raw.headers["x-replay-status"] == "hit" and raw.parse() == recorded
        for endpoint in ("/_replay/health", "/_replay/stats"):
            answer = httpx2.get(proxy.url + endpoint)
            assert answer.status_code == 200
            seen.append(answer.content)
        assert "rediss://replay-team:***@127.0.0.1:" in httpx2.get(
            proxy.url + "/_replay/health").json()["store"]
    # The right server with a wrong password, and with a certificate authority it does not
    # trust: each a 503 that says what failed, without the password.
    wrong_password = redis_tls_url.replace(quote(REDIS_PASSWORD, safe=""), "not-the-password")
    wrong_ca = redis_tls_url.split("?")[0] + "?ssl_ca_certs=" + quote(
        str(_other_ca(tmp_path)), safe="")
    for store, reason in ((wrong_password, "AuthenticationError"),
                          (wrong_ca, "certificate verify failed")):
        with run_proxy(Settings(cassettes=cassettes, store=store, mode=Mode.RECORD,
                                openai_upstream=simulator.url)) as proxy:
            answer = httpx2.post(proxy.url + "/c/tls/v1/chat/completions", json=CHAT,
                                 headers={"Authorization": "Bearer sk-x"})
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "store_unavailable"
            assert reason in answer.json()["error"]["message"]
            seen.append(answer.content)
    for number, shown in enumerate(seen):
        assert_no_password(f"answer {number}", shown)
    assert_no_password("the proxy's log", caplog.text)
    assert (cassettes / ".replay-proxy" / "runs").is_dir()
    assert_no_password("the files beside the cassettes", stored_bytes(cassettes))
    assert_no_password("Redis", redis_bytes(redis_tls_url))


def _other_ca(folder: Path) -> Path:
    from replay_proxy.tools.testing import make_tls_files

    other = folder / "other-ca"
    other.mkdir()
    return Path(make_tls_files(str(other)).ca)


def test_store_descriptions_and_errors_never_hold_the_password(
        redis_tls_server: tuple[str, TlsFiles]) -> None:
    url = redis_tls_server[0]
    store = open_store(url)
    assert store.description.startswith("rediss://replay-team:***@127.0.0.1:")
    assert describe_store(url) == url.replace(quote(REDIS_PASSWORD, safe=""), "***")
    for bad in (url + "&ttl=soon", url + "&unknown=1", url.replace("/0?", "/0?nodes=x:1&"),
                url.replace("ssl_ca_certs=", "ssl_ca_certs=missing")):
        with pytest.raises(ValueError) as failure:
            open_store(bad)
        assert_no_password(f"the error for {describe_store(bad)}", str(failure.value))


def test_serve_does_not_print_the_password(redis_tls_url: str, tmp_path: Path) -> None:
    with run_proxy_process("--mode", "replay", "--store", redis_tls_url, "--cassettes",
                           str(tmp_path)) as (url, process):
        assert httpx2.get(url + "/_replay/health").status_code == 200
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        assert_no_password("serve's output", process.stderr.read())


def test_export_does_not_print_the_password(redis_tls_url: str, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from replay_proxy.tools.cli import main

    result = CliRunner().invoke(main, ["export", "--from", redis_tls_url, "--to",
                                       str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert_no_password("export's output", result.output)


@pytest.mark.parametrize("command", [["ls"], ["export", "--to", "OUT"], ["drift"]])
def test_a_store_that_cannot_be_reached_is_a_clear_error(command: list[str],
                                                         tmp_path: Path) -> None:
    from click.testing import CliRunner
    from replay_proxy.tools.cli import main
    from replay_proxy.tools.testing import free_port

    password = quote(REDIS_PASSWORD, safe="")
    unreachable = f"redis://user:{password}@127.0.0.1:{free_port()}/0?timeout=1"
    where = ["--from", unreachable] if command[0] == "export" else ["--store", unreachable]
    arguments = [part.replace("OUT", str(tmp_path / "out")) for part in command] + where
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, TypeError)
    assert "could not be reached" in result.output or "unavailable" in result.output.lower()
    assert_no_password(f"{command[0]}'s error", result.output)


def test_a_malformed_store_url_is_a_usage_error_that_hides_the_password(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from replay_proxy.tools.cli import main

    # The password is not percent-encoded, so the URL does not parse.
    result = CliRunner().invoke(main, ["ls", "--store",
                                       f"redis://user:{REDIS_PASSWORD}@127.0.0.1:1/0"])
    assert result.exit_code == 2, result.output
    assert "Redis store URL" in result.output
    assert_no_password("ls's usage error", result.output)
