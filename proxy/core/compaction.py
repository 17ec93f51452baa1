"""Which recordings of a key `replay-proxy compact` drops: those byte-identical to an earlier
recording of the same fingerprint, as refreshes made before `verified_at` existed stored every
unchanged answer again. Pure.

Two recordings are the same answer when their fingerprint, status, headers and bytes (the body,
or each event's raw bytes) are equal; when they were recorded, how long they took and the
events' time offsets do not count. The first is kept, and it takes the latest time any of its
copies was recorded or verified as its `verified_at`, which is what a refresh that gets the
same answer records today.

What any replay policy answers stays the same: `pinned` and a fingerprint value pick the first
recording of a fingerprint, which is kept where it was; `latest` picks the last recording, so
when that one is a copy of an earlier answer that is no longer last once the copies are gone,
it stays too.

A sequence is left as it is: its recordings are replayed in order (the n-th identical request
gets the n-th), so two equal answers in it are two places, not two copies.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace

from .cassette import Entry, Recording


@dataclass(frozen=True)
class Compaction:
    entry: Entry  # the entry without its duplicates (the same object when there were none)
    dropped: int  # recordings dropped


def answer_identity(recording: Recording) -> Hashable:
    """What makes two recordings the same answer, byte for byte."""
    events = None if recording.events is None else tuple(e.raw for e in recording.events)
    return (recording.system_fingerprint, recording.status,
            tuple(sorted(recording.headers.items())), recording.body, events)


def compact(entry: Entry) -> Compaction:
    if entry.sequence:
        return Compaction(entry, 0)
    kept: dict[Hashable, Recording] = {}
    for recording in entry.recordings:
        identity = answer_identity(recording)
        first = kept.get(identity)
        if first is None:
            kept[identity] = recording
            continue
        seen = [at for at in (first.verified_at, recording.verified_at, recording.recorded_at)
                if at]
        kept[identity] = replace(first, verified_at=max(seen) if seen else None)
    # dict keeps the order in which each answer was first recorded.
    recordings = list(kept.values())
    last = entry.recordings[-1] if entry.recordings else None
    if last is not None and answer_identity(last) != answer_identity(recordings[-1]):
        recordings.append(last)  # what `latest` replays
    dropped = len(entry.recordings) - len(recordings)
    if not dropped:
        return Compaction(entry, 0)
    return Compaction(replace(entry, recordings=tuple(recordings)), dropped)
