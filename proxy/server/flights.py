"""One upstream call per key at a time, its answer shared live with every client that asked.

The first request for a key becomes the flight's pump (a task reading the upstream); every
client, the first included, follows the flight and gets the same bytes as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]
    is_stream: bool
    replay_status: str  # what X-Replay-Status says: recorded or passthrough
    drift: str | None = None


class FlightCut(Exception):
    """The upstream exchange broke after the head was sent."""


@dataclass
class Flight:
    head: Head | None = None
    chunks: list[bytes] = field(default_factory=list)
    finished: bool = False
    error: BaseException | None = None
    followers: int = 0
    pump: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self, head: Head) -> None:
        self.head = head
        self._notify()

    def push(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._notify()

    def finish(self) -> None:
        self.finished = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    async def wait_head(self) -> Head:
        while self.head is None:
            if self.error is not None:
                raise self.error
            await self._changed.wait()
        return self.head

    async def follow(self) -> AsyncIterator[bytes]:
        """Every chunk from the first, waiting for new ones until the flight ends."""
        index = 0
        while True:
            while index < len(self.chunks):
                yield self.chunks[index]
                index += 1
            if self.error is not None:
                raise FlightCut(str(self.error)) from self.error
            if self.finished:
                return
            await self._changed.wait()


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def join(self, name: str, pump: Callable[[Flight], Awaitable[None]]) -> Flight:
        """The flight under way for `name`, or a new one whose pump is started now."""
        flight = self._flights.get(name)
        if flight is not None and not flight.finished and flight.error is None:
            flight.followers += 1
            return flight
        flight = Flight(followers=1)
        self._flights[name] = flight

        async def run() -> None:
            try:
                await pump(flight)
            except asyncio.CancelledError:
                flight.fail(FlightCut("the exchange was abandoned by every client"))
                raise
            except Exception as exc:
                flight.fail(exc)
            finally:
                if self._flights.get(name) is flight:
                    del self._flights[name]

        flight.pump = asyncio.get_running_loop().create_task(run())
        return flight

    def leave(self, flight: Flight) -> None:
        """A client went away; with no client left, an unfinished upstream call is cancelled."""
        flight.followers -= 1
        if flight.followers <= 0 and not flight.finished and flight.pump is not None:
            flight.pump.cancel()

    async def drain(self) -> None:
        """Wait until every flight under way, storing included, is done."""
        pumps = [flight.pump for flight in self._flights.values() if flight.pump is not None]
        await asyncio.gather(*pumps, return_exceptions=True)

    async def close(self) -> None:
        """Let finished flights finish storing; abandon the ones still reading upstream."""
        pumps = []
        for flight in list(self._flights.values()):
            if flight.pump is None:
                continue
            if not flight.finished:
                flight.pump.cancel()
            pumps.append(flight.pump)
        await asyncio.gather(*pumps, return_exceptions=True)
