"""An Azure deployment name is a name: `.` or one ending in a newline is a client error."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

CHAT = orjson.dumps({"model": "gpt-4o-mini", "seed": 1,
                     "messages": [{"role": "user", "content": "Hi"}]})


def _post(url: str, path: str) -> tuple[int, bytes]:
    """POST to `path` exactly as written: HTTP clients resolve `/./` before sending."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\napi-key: {SECRET_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(CHAT)}\r\n"
                     "Connection: close\r\n\r\n".encode() + CHAT)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("deployment", [".", "gpt%0A", "gpt%0a", "-gpt"])
def test_a_dot_or_a_trailing_newline_is_refused_with_400(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path,
        deployment: str) -> None:
    path = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"
    with make_proxy(Mode.RECORD) as proxy:
        status, body = _post(proxy.url, path.format(deployment))
        assert status == 400, body
        error = orjson.loads(body)["error"]
        assert error["code"] == "invalid_deployment" and error["param"] == "deployment"
        assert "deployment name" in error["message"]
        assert simulator.state.calls == 0 and recorded_files(cassettes) == []
        status, body = _post(proxy.url, path.format("gpt-4o"))  # the proxy still serves
        assert status == 200, body
