"""A replay-proxy in a child process that lives exactly as long as its parent wants it.

The pytest plugin runs its proxy this way: off the test process's interpreter (no GIL shared
with the tests, no heap for their garbage collector to walk), on uvloop, and shared by the
xdist workers of one session.

- The parent binds the listening socket and hands it to the child, so the URL is known at once
  and a client that connects before the child is up waits in the socket's backlog: nothing
  polls for readiness. `start_on_first_client` even defers the start until a client connects.
- The child reads what it serves (a `Launch`) from its standard input, then keeps watching it:
  when the parent closes it, or dies however it dies (killed included), the child finishes
  storing what it answered, writes its final counters to its standard output and exits.
- Its log goes to a file, never to the parent's (captured) output.

Importing this module imports neither the server nor click: only the child does.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import PytestInputs

if TYPE_CHECKING:
    from aiohttp import web

    from ..server.state import ProxyState

_LENGTH = struct.Struct(">Q")
STOP_TIMEOUT = 60.0  # seconds for the child to finish storing and exit


class ProxyProcessError(RuntimeError):
    """The child could not start, or stopped on its own; the message is its last words."""


@dataclass(frozen=True)
class Launch:
    """What the child serves: a pytest session's options and one directory's replay_config,
    resolved in the child as the plugin resolves them, and where it notes its misses."""

    inputs: PytestInputs
    replay_config: Mapping[str, Any] = field(default_factory=dict)
    miss_log: str | None = None

    def encode(self) -> bytes:
        """As JSON, for the child's standard input (a value JSON lacks, such as a Path in a
        replay_config, goes as its text, which the options parse as they parse a file's)."""
        inputs = self.inputs
        return json.dumps({
            "args": list(inputs.args), "ini": [list(pair) for pair in inputs.ini],
            "ini_file": inputs.ini_file, "ini_base": inputs.ini_base,
            "invocation_dir": inputs.invocation_dir, "rootdir": inputs.rootdir,
            "run_id": inputs.run_id, "replay_config": dict(self.replay_config),
            "miss_log": self.miss_log}, default=str).encode()

    @classmethod
    def decode(cls, data: bytes) -> Launch:
        found = json.loads(data)
        inputs = PytestInputs(
            tuple(found["args"]), tuple((str(name), value) for name, value in found["ini"]),
            found["ini_file"], found["ini_base"], found["invocation_dir"], found["rootdir"],
            found["run_id"])
        return cls(inputs, found["replay_config"], found["miss_log"])


class ProxyProcess:
    """The parent's side: the socket, the child, and stopping it."""

    def __init__(self, launch: Launch, log_path: Path, environ: Mapping[str, str]) -> None:
        self.launch = launch
        self.log_path = log_path
        self._environ = dict(environ)
        self._socket: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(1024)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self.stuck = False  # did not stop in time, and was killed

    def start(self) -> None:
        """Start the child now (once; later calls do nothing)."""
        with self._lock:
            if self.process is not None or self._socket is None:
                return
            listening = self._socket
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "replay_proxy.tools.proxy_process",
                     str(listening.fileno())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    pass_fds=(listening.fileno(),), env=self._environ)
            assert self.process.stdin is not None
            launch = self.launch.encode()
            try:
                self.process.stdin.write(_LENGTH.pack(len(launch)) + launch)
                self.process.stdin.flush()
            except BrokenPipeError:
                pass  # it died at once: its log says why, and a client finds it gone
            # The child holds the socket now; without this copy, a client of a child that has
            # died is refused at once rather than left waiting in the backlog.
            listening.close()
            self._socket = None

    def start_on_first_client(self) -> None:
        """Start the child when the first client connects: for a parent that cannot know
        whether any test will use the proxy (an xdist controller), a thread blocked in select."""
        if self._socket is None or self._watcher is not None:
            return
        self._wake = os.pipe()
        listening, wake = self._socket.fileno(), self._wake[0]

        def wait() -> None:
            readable, _, _ = select.select([listening, wake], [], [])
            if listening in readable:
                self.start()

        self._watcher = threading.Thread(target=wait, name="replay-proxy-starter", daemon=True)
        self._watcher.start()

    def _stop_watching(self) -> None:
        if self._wake is not None:
            os.write(self._wake[1], b"x")
            if self._watcher is not None:
                self._watcher.join(timeout=10)
            for end in self._wake:
                os.close(end)
            self._wake = None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def last_words(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT, used: bool = True) -> dict[str, Any] | None:
        """Stop the child and return its final counters (None if it never started, or
        died). One that no client `used` is ended at once, even halfway through its start."""
        self._stop_watching()
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            process = self.process
        if process is None or process.returncode is not None:  # never started, or stopped
            return None
        if not used:
            process.terminate()
            process.communicate()
            return None
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Stuck: its stacks go to its log before it is killed, for the report.
            process.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            process.kill()
            process.communicate()
            self.stuck = True
            return None
        if process.returncode != 0 or not out.strip():
            return None
        import json

        final: dict[str, Any] = json.loads(out)
        return final


def final_counters(state: ProxyState) -> dict[str, Any]:
    """What a stopped proxy tells its parent: its counters, its cassette root, and the keys its
    run used (for the pytest summary's unused recordings)."""
    used = sorted(state.usage.seen) if state.usage is not None else []
    return {**state.snapshot(), "cassettes": str(state.settings.cassettes),
            "used": [list(name) for name in used]}


# ---- the child -------------------------------------------------------------------------------

def _read_launch() -> Launch:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = os.read(0, count - len(data))
            if not chunk:
                raise SystemExit(0)  # the parent left before saying what to serve
            data += chunk
        return data

    (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
    return Launch.decode(exactly(length))


def main(argv: list[str]) -> int:  # (returns only on a bad configuration)
    # Ctrl-C reaches the whole process group: the parent decides when this stops, after its own
    # summary has read the counters.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    listening_fd = int(argv[1])
    launch = _read_launch()

    import asyncio
    import logging

    import click
    import orjson

    from .configuration import plugin_settings

    try:
        settings, log_level = plugin_settings(launch.inputs, launch.replay_config)
    except click.ClickException as exc:
        print(f"replay-proxy: {exc.format_message()}", file=sys.stderr, flush=True)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("replay_proxy")
    logger.handlers = [handler]
    logger.setLevel(log_level.upper())

    from ..server.handler import ProxyRunner, ReplayProxy
    from ..server.serving import new_event_loop

    proxy = ReplayProxy(settings, dict(os.environ),
                        miss_log=Path(launch.miss_log) if launch.miss_log else None)
    loop = new_event_loop("auto")
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(ProxyRunner(proxy, shutdown_timeout=5.0), listening_fd))
    finally:
        loop.close()
    try:
        sys.stdout.buffer.write(orjson.dumps(final_counters(proxy.state)))
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # the parent is gone: nobody asks for the counters
    sys.stderr.flush()
    measuring = sys.modules.get("coverage")
    if measuring is not None:  # a measured run (this project's own tests) keeps its figures
        current = measuring.Coverage.current()
        if current is not None:
            current.stop()
            current.save()
    # Everything is stored, logged and said: the interpreter's own teardown (unloading every
    # module, a quarter of a second) would only keep the parent waiting.
    os._exit(0)


async def _serve(runner: web.BaseRunner, listening_fd: int) -> None:
    import asyncio

    from aiohttp import web

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def parent_spoke() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:  # closed by the parent, or by its death
            loop.remove_reader(0)
            stopped.set()

    loop.add_reader(0, parent_spoke)
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    await runner.setup()
    try:
        site = web.SockSite(runner, socket.socket(fileno=listening_fd))
        await site.start()
        await stopped.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
