"""Running a server in this process until SIGINT or SIGTERM: the event loop (uvloop when it is
installed, else asyncio's), the listening socket (SO_REUSEPORT for --workers) and shutdown;
and the checks made before any of it starts.

The workers of one `serve` share their port through SO_REUSEPORT, which keeps the kernel
spreading connections over them (one listening socket handed to every worker would let the
first to wake take a client's whole keep-alive pool). SO_REUSEPORT would also let a second
`serve --workers` by the same user join the port and take part of its traffic, so the parent
first binds the port without it (`check_port_free`): anything already listening there, a
replay-proxy included, makes that fail. Two `serve`s started within the same moment could
both pass; one started while another serves cannot.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

from ..core.modes import Mode
from ..core.settings import Settings
from ..store import store_folder

LOOPS = ("auto", "uvloop", "asyncio")


def check_port_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when anything listens on host:port, a replay-proxy served by
    --workers included: the port is bound here without SO_REUSEPORT, and let go at once."""

    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, host, port, start_serving=False)
        server.close()
        await server.wait_closed()

    asyncio.run(bind())


def store_problem(settings: Settings, mode: Mode) -> str | None:
    """Why a proxy would answer nothing but errors with these settings, said before it starts:
    a store folder that is a file, or, in replay mode, one that does not exist (every request
    would miss; record mode creates it). Raises ValueError for an unknown kind of store."""
    folder = store_folder(settings.store_spec)
    if folder is None:  # Redis: an empty database is a store like any other
        return None
    option = settings.option_spelling.flag("store" if settings.store else "cassettes")
    if folder.exists() and not folder.is_dir():
        return f"{option} {folder} is a file, not a folder of cassettes."
    if mode is Mode.REPLAY and not folder.is_dir():
        return (f"{option} {folder} does not exist, so replay mode would answer every request "
                "with a miss. Check the path (a relative one starts from the working directory, "
                f"or from the configuration file's folder), or record first "
                f"({settings.option_spelling('mode', 'record')}).")
    return None


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """`auto` takes uvloop when it can be imported (it cuts the cost of every request), else
    asyncio's own loop; `uvloop` insists on it."""
    if choice not in LOOPS:
        raise ValueError(f"unknown event loop {choice!r}: choose one of {', '.join(LOOPS)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("--loop uvloop: uvloop is not installed "
                                 "(pip install uvloop; it does not exist on Windows)") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def serve(make_runner: Callable[[], web.BaseRunner], host: str, port: int,
          reuse_port: bool = False, loop_choice: str = "auto") -> None:
    """Serve until SIGINT/SIGTERM, then close connections and clean up. An address already in
    use raises OSError(EADDRINUSE) before anything is served."""
    event_loop = new_event_loop(loop_choice)
    asyncio.set_event_loop(event_loop)
    try:
        event_loop.run_until_complete(_serve(make_runner, host, port, reuse_port))
    finally:
        event_loop.run_until_complete(event_loop.shutdown_asyncgens())
        event_loop.close()
        asyncio.set_event_loop(None)


async def _serve(make_runner: Callable[[], web.BaseRunner], host: str, port: int,
                 reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    runner = make_runner()
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        await stopped.wait()
    finally:
        await runner.cleanup()
