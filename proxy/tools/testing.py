"""Helpers for tests that users want too: run the proxy or the simulator in a background thread.

    with run_simulator() as sim, run_proxy(Settings(openai_upstream=sim.url, ...)) as proxy:
        client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test")
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from ..core.settings import Settings
from ..server.handler import ProxyRunner, ReplayProxy
from ..server.state import ProxyState
from .simulator import SIM_STATE, SimulatorState, create_simulator


class ServerThread:
    """A server (an aiohttp runner) on 127.0.0.1, from its own thread and event loop."""

    def __init__(self, make_runner: Callable[[], web.BaseRunner], port: int = 0) -> None:
        self._make_runner = make_runner
        self._requested_port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.BaseRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = self._make_runner()
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._requested_port)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        self.port = int(server.sockets[0].getsockname()[1])

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. to read its state safely)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout)

    def invoke(self, function: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a plain function on the server's loop thread, where its state is safe to change."""

        async def run() -> Any:
            return function()

        return self.call(run(), timeout)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class ProxyThread(ServerThread):
    def __init__(self, make_proxy: Callable[[], ReplayProxy], port: int = 0) -> None:
        self.proxy: ReplayProxy | None = None

        def make_runner() -> web.BaseRunner:
            self.proxy = make_proxy()
            return ProxyRunner(self.proxy, shutdown_timeout=1.0)

        super().__init__(make_runner, port)

    @property
    def state(self) -> ProxyState:
        assert self.proxy is not None
        return self.proxy.state


class SimulatorThread(ServerThread):
    def __init__(self, make_app: Callable[[], web.Application], port: int = 0) -> None:
        self.app: web.Application | None = None

        def make_runner() -> web.BaseRunner:
            self.app = make_app()
            return web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)

        super().__init__(make_runner, port)

    @property
    def state(self) -> SimulatorState:
        assert self.app is not None
        return self.app[SIM_STATE]


@contextmanager
def run_proxy(settings: Settings, environ: dict[str, str] | None = None,
              port: int = 0) -> Iterator[ProxyThread]:
    server = ProxyThread(lambda: ReplayProxy(settings, environ or {}), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def run_simulator(state: SimulatorState | None = None, port: int = 0) -> Iterator[SimulatorThread]:
    server = SimulatorThread(lambda: create_simulator(state), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def run_proxy_process(*args: str, env: dict[str, str] | None = None,
                      timeout: float = 30.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`replay-proxy serve ARGS` in a child process on a free port; yields (url, process)."""
    port = free_port()
    command = [sys.executable, "-m", "replay_proxy", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError("replay-proxy exited at start: "
                                   + (process.stderr.read() if process.stderr else b"").decode())
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replay-proxy did not listen on {port}") from None
                time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


@contextmanager
def run_redis(timeout: float = 20.0) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL."""
    import shutil
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/test installs Debian's "
                           "redis-server package)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="replay-redis-") as folder:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(64).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)
