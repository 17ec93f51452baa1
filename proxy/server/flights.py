"""One upstream call per key at a time, its answer shared live with every client that asked.

The first request for a key becomes the flight's pump (a task reading the upstream); every
client, the first included, follows the flight and gets the same bytes as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from ..core.cassette import Drift
from ..core.plan import ReplayStatus

log = logging.getLogger("replay_proxy")


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]
    is_stream: bool
    replay_status: ReplayStatus  # what X-Replay-Status says: recorded or passthrough (or hit)
    drift: Drift | None = None


class FlightCut(Exception):
    """The upstream exchange broke after the head was sent."""


class ClientGone(Exception):
    """The client of a follower closed its connection."""


@dataclass
class Flight:
    head: Head | None = None
    chunks: list[bytes] = field(default_factory=list)
    finished: bool = False
    error: BaseException | None = None
    followers: int = 0
    pump: asyncio.Task[None] | None = None
    # False once the answer is too large to keep whole: no client joins any more, and the
    # chunks every follower has sent are let go.
    shared: bool = True
    kept: bool = True  # False when the answer will not be stored after all
    # True once the upstream sent a complete answer (a stream's [DONE]) that is still being
    # read to its end: a client leaving now does not cancel it.
    settled: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _dropped: int = 0  # chunks let go from the front of `chunks`
    _buffered: int = 0  # bytes in `chunks`
    _cursors: dict[object, int] = field(default_factory=dict)  # follower -> next chunk

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def wake(self, _gone: object = None) -> None:
        self._notify()

    def start(self, head: Head) -> None:
        self.head = head
        self._notify()

    def push(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._buffered += len(chunk)
        self._notify()

    def finish(self) -> None:
        self.finished = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    def unshare(self) -> None:
        """From now on the answer streams through: new clients start a flight of their own."""
        self.shared = False
        self._notify()

    async def wait_head(self, gone: asyncio.Future[None] | None = None) -> Head:
        while self.head is None:
            if self.error is not None:
                raise self.error
            if gone is not None and gone.done():
                raise ClientGone()
            await self._changed.wait()
        return self.head

    async def drained(self, limit: int) -> None:
        """Wait while an unshared flight holds more than `limit` bytes its followers have not
        sent yet: a slow client slows the upstream read instead of filling memory."""
        while not self.shared and self._buffered > limit and self.followers > 0:
            await self._changed.wait()

    async def follow(self, gone: asyncio.Future[None] | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """Every chunk from the first, waiting for new ones until the flight ends."""
        token = object()
        index = self._dropped
        self._cursors[token] = index
        try:
            while True:
                while index - self._dropped < len(self.chunks):
                    chunk = self.chunks[index - self._dropped]
                    index += 1
                    self._cursors[token] = index
                    yield chunk
                if not self.shared:
                    self._trim()
                if self.error is not None:
                    raise FlightCut(str(self.error)) from self.error
                if self.finished:
                    return
                if gone is not None and gone.done():
                    raise ClientGone()
                await self._changed.wait()
        finally:
            del self._cursors[token]

    def _trim(self) -> None:
        if len(self._cursors) < self.followers:
            return  # a follower has yet to start reading: it needs every chunk
        sent = min(self._cursors.values()) - self._dropped
        if sent > 0:
            self._buffered -= sum(len(chunk) for chunk in self.chunks[:sent])
            del self.chunks[:sent]
            self._dropped += sent
            self._notify()


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def join(self, name: str, pump: Callable[[Flight], Awaitable[None]]) -> Flight:
        """The flight under way for `name`, or a new one whose pump is started now."""
        flight = self._flights.get(name)
        if flight is not None and not flight.finished and flight.error is None and flight.shared:
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
                if flight.finished:  # the clients have their answers; only storing was left
                    log.exception("an exchange failed after it was answered (%s)",
                                  name.replace("\x1f", " "))
                flight.fail(exc)
            finally:
                if self._flights.get(name) is flight:
                    del self._flights[name]

        flight.pump = asyncio.get_running_loop().create_task(run())
        return flight

    def leave(self, flight: Flight) -> None:
        """A client went away; with no client left, an unfinished upstream call is cancelled."""
        flight.followers -= 1
        if flight.followers <= 0 and not (flight.finished or flight.settled) \
                and flight.pump is not None:
            flight.pump.cancel()
        flight.wake()  # a pump waiting for this follower to catch up looks again

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
            if not (flight.finished or flight.settled):
                flight.pump.cancel()
            pumps.append(flight.pump)
        await asyncio.gather(*pumps, return_exceptions=True)
