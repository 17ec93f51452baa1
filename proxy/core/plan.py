"""What to do with one request: the whole decision, as a pure function returning a typed plan.

The mode, the key's entry (or None), the fingerprint policy and, for a sequenced key, the
request's occurrence go in; one of four plans comes out:

- `Replay(recording)`: answer with a stored recording;
- `Miss(reason)`: refuse, saying why (`reason` is data; `explain` turns it into text);
- `Forward(storage)`: ask the upstream and store the answer as `storage` says;
- `Passthrough()`: ask the upstream, store nothing.

The server and the recorder only carry plans out; the recorder asks again, with the entry it
re-reads under the key's lock, so a recording another process made meanwhile is replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from . import fingerprints
from .cassette import Drift, Entry, Recording
from .fingerprints import FingerprintChoice
from .modes import Mode


@dataclass(frozen=True)
class Position:
    """Where a request of a sequenced key stands: the n-th identical request of its session,
    against the number of answers the key has recorded."""

    occurrence: int
    recorded: int

    @property
    def repeats_last(self) -> bool:
        return self.occurrence > self.recorded

    def header(self) -> str:
        """The value of X-Replay-Sequence: `n/total`."""
        return f"{self.occurrence}/{self.recorded}"


class ReplayStatus(StrEnum):
    """How a request was answered, as the X-Replay-Status header tells the client."""

    HIT = "hit"  # from a stored recording
    MISS = "miss"  # refused: no recording answers it
    RECORDED = "recorded"  # the upstream's answer, stored
    PASSTHROUGH = "passthrough"  # the upstream's answer, not stored
    ERROR = "error"  # the proxy's own error (a bad request, an upstream that failed, ...)


class Storage(StrEnum):
    """How a forwarded answer is stored."""

    ALTERNATIVE = "alternative"  # one more recording of the key; replay picks by fingerprint
    NEXT_IN_SEQUENCE = "next"  # appended as the sequence's next answer
    RESTART_AT = "restart"  # refresh: answer n replaces answer n and drops those after it


@dataclass(frozen=True)
class Replay:
    recording: Recording
    fingerprint: str | None  # the fingerprint policy's choice; None for sequenced keys
    position: Position | None = None
    stale: bool = False  # older than --max-age: replayed all the same, and counted


@dataclass(frozen=True)
class NotRecorded:
    """The key has no recording at all."""


@dataclass(frozen=True)
class FingerprintNotRecorded:
    wanted: str
    recorded: tuple[str | None, ...]


@dataclass(frozen=True)
class SequenceExhausted:
    """A write past the end of a recorded sequence: replaying any answer would lie."""

    method: str
    position: Position


MissReason = NotRecorded | FingerprintNotRecorded | SequenceExhausted


@dataclass(frozen=True)
class Miss:
    reason: MissReason


@dataclass(frozen=True)
class Forward:
    storage: Storage
    position: Position | None = None
    classify_drift: bool = False  # refresh of a generation key: compare with what was recorded


@dataclass(frozen=True)
class Passthrough:
    pass


Plan = Replay | Miss | Forward | Passthrough


def plan(mode: Mode, entry: Entry | None, *, fingerprint: FingerprintChoice,
         occurrence: int | None,
         method: str, stale_before: str | None = None) -> Plan:
    """The plan for one request. `mode` is resolved (never AUTO); `occurrence` is None unless
    the key is sequenced, else the request's 1-based place among identical requests of its
    session. With `stale_before` (an ISO time: now minus --max-age), a key last recorded or
    confirmed before it is stale: record mode records it again, replay mode still replays it."""
    if mode is Mode.PASSTHROUGH:
        return Passthrough()
    if mode is Mode.AUTO:
        raise ValueError("plan() needs a resolved mode; call resolve_mode first")
    stale = (entry is not None and bool(entry.recordings) and stale_before is not None
             and entry.last_confirmed() < stale_before)
    if occurrence is not None:
        return _sequenced(mode, entry, occurrence, method, stale)
    if mode is Mode.REFRESH or (mode is Mode.RECORD and stale):
        return Forward(Storage.ALTERNATIVE, classify_drift=entry is not None)
    if entry is None or not entry.recordings:
        return Forward(Storage.ALTERNATIVE) if mode is Mode.RECORD else Miss(NotRecorded())
    selection = fingerprints.select(entry, fingerprint)
    if selection.recording is None:
        return Miss(FingerprintNotRecorded(fingerprint, tuple(entry.fingerprints())))
    return Replay(selection.recording, selection.fingerprint, stale=stale)


def _sequenced(mode: Mode, entry: Entry | None, occurrence: int, method: str,
               stale: bool) -> Plan:
    if occurrence < 1:
        raise ValueError(f"occurrence counts from 1, got {occurrence}")
    recordings = entry.recordings if entry is not None else ()
    position = Position(occurrence, len(recordings))
    if mode is Mode.REFRESH or (mode is Mode.RECORD and stale):
        return Forward(Storage.RESTART_AT, position)
    if occurrence <= len(recordings):
        return Replay(recordings[occurrence - 1], None, position, stale=stale)
    if mode is Mode.RECORD:
        return Forward(Storage.NEXT_IN_SEQUENCE, position)
    if not recordings:
        return Miss(NotRecorded())
    if method.upper() in ("GET", "HEAD"):  # a finished job stays finished
        return Replay(recordings[-1], None, position, stale=stale)
    return Miss(SequenceExhausted(method.upper(), position))


def stored_entry(storage: Storage, existing: Entry | None, fresh: Entry,
                 recording: Recording, position: Position | None) -> Entry:
    """The entry to write once a forwarded answer is complete. `existing` is the key's entry as
    read under its lock; `fresh` an empty entry for the key, used when there is none."""
    base = existing if existing is not None else fresh
    if storage is Storage.ALTERNATIVE:
        if existing is not None and recording.drift is Drift.SAME:
            # A refresh that got the same answer again: note when, keep one copy.
            before = fingerprints.baseline(existing, recording.system_fingerprint)
            if before is not None:
                return existing.verified(before, recording.recorded_at)
        return base.add(recording)
    if storage is Storage.NEXT_IN_SEQUENCE:
        return base.as_sequence((*base.recordings, recording))
    assert position is not None, "a restarted sequence has a position"
    return base.as_sequence((*base.recordings[: position.occurrence - 1], recording))
