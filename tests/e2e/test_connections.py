"""Client connections: slow and hostile clients are bounded, malformed requests get an
OpenAI-shaped error, and a client hanging up is not an error."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import httpx2
import orjson
import pytest
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import ProxyThread, SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

CHAT = {"model": "gpt-4o-mini", "seed": 1, "messages": [{"role": "user", "content": "Hi"}]}
AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}
BODY = orjson.dumps(CHAT)


def _head(length: int = len(BODY), extra: str = "") -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            f"{SECRET_KEY}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode()


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def _error(reply: bytes) -> dict[str, str]:
    body = reply.partition(b"\r\n\r\n")[2]
    error = orjson.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return dict(error)


def _still_serving(proxy: ProxyThread) -> None:
    response = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200, response.text


def test_a_request_head_that_never_completes_is_closed(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD, header_timeout=0.5) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as silent, \
                socket.create_connection(("127.0.0.1", proxy.port)) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert _closed_within(slow, 5) and _closed_within(silent, 5)
            assert time.monotonic() - started < 4
        _still_serving(proxy)


def test_a_keep_alive_connection_outlives_the_header_timeout(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD, header_timeout=0.5) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        for _ in range(2):  # idle longer than the head timeout between two requests
            sock.sendall(_head() + BODY)
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(1.0)
        # The second head arrives in pieces, each well within the timeout.
        sock.sendall(_head()[:20])
        time.sleep(0.2)
        sock.sendall(_head()[20:] + BODY)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        # A body may take longer than a head: the deadline is for heads only.
        sock.sendall(_head())
        for start in range(0, len(BODY), len(BODY) // 4 + 1):
            time.sleep(0.3)
            sock.sendall(BODY[start:start + len(BODY) // 4 + 1])
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)
        sock.sendall(_head() + BODY)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")


@pytest.mark.load
def test_past_max_connections_a_client_gets_a_503_then_service_resumes(
        make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD, header_timeout=1.0, max_connections=20) as proxy:
        slow = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(30)]
        try:
            for sock in slow:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            time.sleep(0.2)
            refused = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert refused.headers["x-should-retry"] == "true"
            assert all(_closed_within(sock, 5) for sock in slow)
        finally:
            for sock in slow:
                sock.close()
        _still_serving(proxy)


def test_expect_100_continue(make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD, max_body=1000) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(_head(extra="Expect: 100-continue\r\n"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(BODY)
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            # Refused before a byte of the body is sent.
            sock.sendall(_head(length=50_000, extra="Expect: 100-continue\r\n"))
            reply = _read_response(sock)
            assert reply.startswith(b"HTTP/1.1 413")
            assert "--max-body" in _error(reply)["message"]
        _still_serving(proxy)
    assert len(recorded_files(cassettes)) == 1


MALFORMED = {
    "bad method": b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "bad version": b"GET /v1/models HTTP/9.x\r\nHost: x\r\n\r\n",
    "bad header token": b"GET /v1/models HTTP/1.1\r\nBad Header: x\r\n\r\n",
    "no colon": b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n",
    "bad content-length": b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
    "two content-lengths": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\n"
                            b"Content-Length: 2\r\n\r\nab"),
    "length and chunked": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "bad chunk size": (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\nzz\r\nabc\r\n0\r\n\r\n"),
    "line too long": b"GET /v1/" + b"m" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "space before colon": b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n",
    "nul in header": b"GET /v1/models HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_an_openai_shaped_400_and_no_traceback(
        make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, raw: bytes) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(raw)
            reply = _read_response(sock)
        assert reply.split(b"\r\n")[0].split()[1] == b"400", reply[:200]
        error = _error(reply)
        assert error["code"] == "malformed_request"
        assert error["type"] == "invalid_request_error"
        _still_serving(proxy)
    assert not [record for record in caplog.records if record.exc_info], "no traceback"


def test_a_multipart_boundary_that_is_not_ascii_is_a_400(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer sk-x\r\nContent-Length: 5\r\n"
                         b"Content-Type: multipart/form-data; boundary=\xe9\r\n\r\n--\xe9\r\n")
            reply = _read_response(sock)
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert _error(reply)["type"] == "invalid_request_error"
        _still_serving(proxy)


def test_the_access_token_comparison_takes_any_text(make_proxy: ProxyFactory) -> None:
    token = "tökén-✓-secret"
    with make_proxy(Mode.RECORD, auth_token=token, openai_api_key=SECRET_KEY) as proxy:
        for presented in ("wrong", "tökén-✓-secreT", "tökén", "tökén-✓-secret-and-more"):
            response = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={
                "Authorization": f"Bearer {presented}".encode()})  # type: ignore[dict-item]
            assert response.status_code == 401, presented
            assert response.json()["error"]["code"] == "invalid_proxy_token"
        accepted = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={
            "Authorization": f"Bearer {token}".encode()})  # type: ignore[dict-item]
        assert accepted.status_code == 200


@pytest.mark.parametrize("mode", [Mode.RECORD, Mode.REPLAY])
def test_a_client_leaving_at_the_end_of_a_stream_is_not_an_error(
        make_proxy: ProxyFactory, simulator: SimulatorThread, caplog: pytest.LogCaptureFixture,
        mode: Mode) -> None:
    simulator.state.event_delay = 0.02
    body = orjson.dumps({**CHAT, "stream": True})
    if mode is Mode.REPLAY:
        with make_proxy(Mode.RECORD) as proxy:
            for seed in range(4):
                httpx2.post(proxy.url + "/v1/chat/completions", headers=AUTH,
                            json={**CHAT, "seed": seed, "stream": True})
    caplog.set_level(logging.WARNING)
    from replay_proxy.core.settings import ReplayTiming

    with make_proxy(mode, replay_timing=ReplayTiming(1.0)) as proxy:
        for seed in range(4):
            body = orjson.dumps({**CHAT, "seed": seed, "stream": True})
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(_head(len(body)) + body)
                data = b""
                while b"[DONE]" not in data:
                    data += sock.recv(65536)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            time.sleep(0.2)
        assert httpx2.get(proxy.url + "/_replay/health").status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.load
def test_slow_clients_past_the_descriptor_limit_do_not_lock_others_out(
        simulator: SimulatorThread, cassettes: Path) -> None:
    import resource
    import subprocess
    import sys

    from replay_proxy.tools.testing import free_port

    def low_limit() -> None:  # the process's ulimit -n: 448 descriptors, no way to raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (448, 448))

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "replay_proxy", "serve", "--port", str(port), "--mode", "record",
         "--cassettes", str(cassettes), "--openai-upstream", simulator.url,
         "--header-timeout", "3"], preexec_fn=low_limit,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def slow_clients(count: int) -> list[socket.socket]:
        opened = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # and never the rest
            opened.append(sock)
        return opened

    slow: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(url + "/_replay/health", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        # The limit leaves descriptors to spare: past it, a client is told so, not reset.
        slow = slow_clients(250)
        busy = httpx2.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=20)
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"]["code"] == "too_many_connections"
        assert all(_closed_within(sock, 10) for sock in slow)
        assert httpx2.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH,
                           timeout=20).status_code == 200
        # More slow clients than descriptors: some are dropped at once, the rest closed at the
        # head deadline, and then everyone is served again.
        slow += slow_clients(600)
        assert all(_closed_within(sock, 10) for sock in slow)
        assert httpx2.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH,
                           timeout=20).status_code == 200
    finally:
        for sock in slow:
            sock.close()
        process.terminate()
        process.wait(10)
        assert process.stderr is not None
        warnings = process.stderr.read().decode()
        process.stderr.close()
    assert "--max-connections 1024 is more than 448 open descriptors" in warnings


def test_the_next_request_head_on_a_connection_gets_a_whole_deadline_of_its_own(
        make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="replay_proxy")
    timeout = 0.5
    with make_proxy(Mode.RECORD, header_timeout=timeout) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        connected = time.monotonic()
        sock.sendall(_head() + BODY)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(max(0.0, connected + timeout / 2 - time.monotonic()))
        # The next head begins before the connection's first deadline, and then stalls.
        sock.sendall(_head()[:20])
        began = time.monotonic()
        assert _closed_within(sock, 5)
        waited = time.monotonic() - began
        # Closed for this head, and a whole timeout after it began, not at the deadline the
        # connection's first head had.
        assert waited >= timeout * 0.9, waited
        _still_serving(proxy)
    closed = [record.getMessage() for record in caplog.records
              if "sent no whole request head" in record.getMessage()]
    assert len(closed) == 1 and f"within {timeout:g} s" in closed[0]
