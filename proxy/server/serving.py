"""Running a server in this process until SIGINT or SIGTERM: the event loop (uvloop when it is
installed, else asyncio's), the listening socket (SO_REUSEPORT for --workers) and shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

LOOPS = ("auto", "uvloop", "asyncio")


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
