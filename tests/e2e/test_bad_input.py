"""Bad input: a clear OpenAI-shaped error, the proxy keeps serving, nothing stored half-way."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx2
import orjson
import pytest
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import ProxyThread, SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

CHAT = {"model": "gpt-4o-mini", "seed": 1, "messages": [{"role": "user", "content": "Hi"}]}
AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}


def _still_serving(proxy: ProxyThread) -> None:
    response = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200, response.text


def _error(response: httpx2.Response) -> dict[str, str]:
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return dict(error)


@pytest.mark.parametrize(("body", "headers", "status", "code"), [
    (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
    (b"", {"Content-Type": "application/json"}, 400, "empty_body"),
    (b'{"model": "\xff\xfe"}', {"Content-Type": "application/json"}, 400, "invalid_json"),
    (orjson.dumps(CHAT), {"Content-Type": "text/plain"}, 415, "invalid_content_type"),
    (orjson.dumps(CHAT), {}, 400, "invalid_content_type"),
    (b"\x1f\x8b broken", {"Content-Type": "application/json", "Content-Encoding": "gzip"}, 400,
     "invalid_body_encoding"),
])
def test_bad_bodies(make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path,
                    body: bytes, headers: dict[str, str], status: int, code: str) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.post(proxy.url + "/v1/chat/completions", content=body,
                               headers={**AUTH, **headers})
        assert response.status_code == status
        assert _error(response)["code"] == code
        assert simulator.state.calls == 0 and recorded_files(cassettes) == []
        _still_serving(proxy)


def test_body_over_max_body_is_413(make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD, max_body=1000) as proxy:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        response = httpx2.post(proxy.url + "/v1/chat/completions", json=big, headers=AUTH)
        assert response.status_code == 413
        assert "--max-body" in _error(response)["message"]

        def chunks():  # no Content-Length: the limit holds for chunked bodies too
            for _ in range(10):
                yield b"x" * 500

        chunked = httpx2.post(proxy.url + "/v1/chat/completions", content=chunks(),
                              headers={**AUTH, "Content-Type": "application/json"})
        assert chunked.status_code == 413
        assert recorded_files(cassettes) == []
        _still_serving(proxy)


@pytest.mark.parametrize("path", ["/", "/admin", "/v2/chat/completions", "/v1/",
                                  "/v1/..%2f..%2fetc/passwd", "/openai/deployments/x/%2e%2e/y"])
def test_unknown_routes_are_404(make_proxy: ProxyFactory, path: str) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.get(proxy.url + path)
        assert response.status_code == 404
        assert _error(response)["code"] == "unknown_url"
        _still_serving(proxy)


@pytest.mark.parametrize("name", ["../escape", "..", "/etc/passwd", "a/../../escape", "..\\x",
                                  "%2e%2e%2fescape", ".hidden", "a//b"])
def test_cassette_traversal_in_header_is_400(make_proxy: ProxyFactory, cassettes: Path,
                                             tmp_path: Path, name: str) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT,
                               headers={**AUTH, "X-Replay-Cassette": name})
        assert response.status_code == 400
        assert _error(response)["code"] == "invalid_cassette_name"
        _still_serving(proxy)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and cassettes not in p.parents]
    assert outside == []


@pytest.mark.parametrize("prefix", ["/c/..%2f..%2fescape", "/c/%2e%2e", "/c/..", "/c/a%2f..",
                                    "/c/.hidden"])
def test_cassette_traversal_in_url_is_400(make_proxy: ProxyFactory, cassettes: Path,
                                          tmp_path: Path, prefix: str) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            body = orjson.dumps(CHAT)
            sock.sendall(f"POST {prefix}/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {SECRET_KEY}\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert b"invalid_cassette_name" in reply
        _still_serving(proxy)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and cassettes not in p.parents] == []


def test_absurd_headers_are_refused_and_the_proxy_keeps_serving(make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT,
                               headers={**AUTH, "X-Huge": "x" * 200_000})
        assert response.status_code in (400, 431)
        many = {f"X-H{i}": "v" for i in range(2000)}
        assert httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT,
                           headers={**AUTH, **many}).status_code in (200, 400, 431)
        _still_serving(proxy)


def test_corrupt_cassette_names_the_file_and_other_keys_work(make_proxy: ProxyFactory,
                                                             cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
        client.chat.completions.create(**{**CHAT, "seed": 2})
    first, second = recorded_files(cassettes)
    first.write_bytes(first.read_bytes()[:100])
    newer = orjson.loads(second.read_bytes())
    with make_proxy(Mode.REPLAY) as proxy:
        statuses = [httpx2.post(proxy.url + "/v1/chat/completions", json={**CHAT, "seed": seed})
                    for seed in (1, 2)]
        broken = next(r for r in statuses if r.status_code == 500)
        assert next(r for r in statuses if r.status_code == 200)
        error = _error(broken)
        assert error["code"] == "cassette_corrupt" and first.name in error["message"]
    newer["format"] = 99
    second.write_bytes(orjson.dumps(newer))
    with make_proxy(Mode.REPLAY) as proxy:
        response = next(r for r in (httpx2.post(proxy.url + "/v1/chat/completions",
                                                json={**CHAT, "seed": seed}) for seed in (1, 2))
                        if second.name in r.text)
        assert response.status_code == 500
        assert _error(response)["code"] == "cassette_format_unsupported"
        assert "Upgrade replay-proxy" in _error(response)["message"]


def test_host_header_and_absolute_uri_never_choose_the_upstream(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    decoy = socket.socket()
    decoy.bind(("127.0.0.1", 0))
    decoy.listen(1)
    decoy.settimeout(0.5)
    decoy_port = decoy.getsockname()[1]
    try:
        with make_proxy(Mode.PASSTHROUGH) as proxy:
            hosted = httpx2.get(proxy.url + "/v1/models",
                                headers={**AUTH, "Host": f"127.0.0.1:{decoy_port}"})
            assert hosted.status_code == 200
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(f"GET http://127.0.0.1:{decoy_port}/v1/models HTTP/1.1\r\n"
                             f"Host: 127.0.0.1:{decoy_port}\r\nAuthorization: Bearer sk-x\r\n"
                             "Connection: close\r\n\r\n".encode())
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and b'"object": "list"' in reply
        assert simulator.state.calls == 2
        with pytest.raises(TimeoutError):
            decoy.accept()  # nothing was ever sent to the host the requests named
    finally:
        decoy.close()


def test_gzip_request_body_is_keyed_like_the_plain_one(make_proxy: ProxyFactory,
                                                       simulator: SimulatorThread) -> None:
    import gzip

    with make_proxy(Mode.RECORD) as proxy:
        plain = httpx2.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        packed = httpx2.post(proxy.url + "/v1/chat/completions",
                             content=gzip.compress(orjson.dumps(CHAT)),
                             headers={**AUTH, "Content-Type": "application/json",
                                      "Content-Encoding": "gzip"})
    assert packed.status_code == 200 and packed.headers["x-replay-status"] == "hit"
    assert packed.content == plain.content
    assert simulator.state.calls == 1


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("PUT", "/_replay/sessions/t1", b"{mode: record", 400, "invalid_json"),
    ("PUT", "/_replay/sessions/t1", b'["record"]', 400, "invalid_json"),
    ("PUT", "/_replay/sessions/t1", b'{"mode": "' + b"r" * 70_000 + b'"}', 413,
     "request_too_large"),
    ("PUT", "/_replay/sessions/t1", b'{"mode": "recrod"}', 400, "invalid_session_options"),
    ("DELETE", "/_replay/sessions/t1", b"", 405, "method_not_allowed"),
    ("POST", "/_replay/warm", b"cassettes=a", 400, "invalid_json"),
    ("POST", "/_replay/warm", b'{"cassettes": "default"}', 400, "invalid_warm"),
])
def test_bad_bodies_for_the_proxys_own_endpoints(make_proxy: ProxyFactory, method: str,
                                                 path: str, body: bytes, status: int,
                                                 code: str) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.request(method, proxy.url + path, content=body)
        assert response.status_code == status, response.text
        assert _error(response)["code"] == code
        # Nothing was half-applied: the session still follows the proxy's mode.
        session = httpx2.get(proxy.url + "/_replay/sessions/t1").json()
        assert session["mode"] is None and session["fingerprint"] is None, session
        _still_serving(proxy)


def test_an_injected_seed_leaves_a_body_that_is_not_json_to_be_refused(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD, inject_seed=7) as proxy:
        response = httpx2.post(proxy.url + "/v1/chat/completions", content=b"{not json",
                               headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400 and _error(response)["code"] == "invalid_json"
        assert simulator.state.calls == 0 and recorded_files(cassettes) == []
        _still_serving(proxy)
