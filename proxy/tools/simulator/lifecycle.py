"""How a stateful resource's status moves: one step per retrieve, as a client polling sees it.

The real API moves batches, vector store files and fine-tuning jobs on its own clock; a
simulator that did the same would make every test wait. Here the clock is the client's own
polling: each retrieve that shows a resource moves it one step, so a recorded poll loop sees
the same sequence of statuses every time. Pure: no I/O, time is handed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Lifecycle:
    """The statuses a kind of resource passes through, as the real API names them."""

    created: str  # answered by the create call
    stages: tuple[str, ...]  # answered by the retrieves that follow, in order
    working: str  # the stage that lasts longest, so it takes any extra retrieves
    finished: str  # the terminal status of a resource left alone

    def schedule(self, poll_steps: int) -> tuple[str, ...]:
        """The statuses answered by retrieves 1..poll_steps; retrieve poll_steps + 1 finishes.

        Every stage is shown once when there are retrieves enough; extra retrieves stay in the
        working stage (a batch spends its time `in_progress`, not `finalizing`), and with fewer
        retrieves than stages only the working stage is shown.
        """
        if poll_steps <= 0:
            return ()
        if poll_steps < len(self.stages):
            return (self.working,) * poll_steps
        at = self.stages.index(self.working)
        extra = poll_steps - len(self.stages)
        return self.stages[:at] + (self.working,) * (extra + 1) + self.stages[at + 1:]


@dataclass
class Progress:
    """One resource's place in its lifecycle; `poll_steps` is fixed when it is created."""

    lifecycle: Lifecycle
    poll_steps: int
    now: int  # creation time, unix seconds
    polls: int = 0
    ended: str | None = None
    # An interruption (cancel, a failed validation): the status shown until the next
    # retrieve, then the terminal status it ends in.
    showing: str | None = None
    ending: str | None = None
    reached_at: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reached_at.setdefault(self.lifecycle.created, self.now)

    @property
    def status(self) -> str:
        if self.ended is not None:
            return self.ended
        if self.showing is not None:
            return self.showing
        if self.polls == 0:
            return self.lifecycle.created
        return self.lifecycle.schedule(self.poll_steps)[self.polls - 1]

    @property
    def done(self) -> bool:
        return self.ended is not None

    def advance(self, now: int) -> bool:
        """One retrieve's worth of progress; True when this step ended the resource."""
        if self.ended is not None:
            return False
        if self.ending is not None:
            self._end(self.ending, now)
            return True
        self.polls += 1
        if self.polls > self.poll_steps:
            self._end(self.lifecycle.finished, now)
            return True
        self.reached_at.setdefault(self.status, now)
        return False

    def interrupt(self, ending: str, now: int, showing: str | None = None) -> None:
        """End in `ending`: at once, or after one more retrieve that shows `showing`."""
        if self.ended is not None:
            return
        if showing is None:
            self._end(ending, now)
            return
        self.showing = showing
        self.ending = ending
        self.reached_at.setdefault(showing, now)

    def _end(self, status: str, now: int) -> None:
        self.ended = status
        self.showing = None
        self.reached_at.setdefault(status, now)
