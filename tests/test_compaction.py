"""Which recordings `compact` drops: only exact copies of an earlier answer of the same
fingerprint, whatever their times; never a place in a sequence."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from replay_proxy.core.cassette import Drift, Entry, Recording, SseEvent
from replay_proxy.core.compaction import answer_identity, compact
from replay_proxy.core.fingerprints import LATEST, PINNED, select

KEY = "a" * 64
A = Recording(200, {"content-type": "application/json", "x-request-id": "req_1"},
              b'{"answer": "A"}', system_fingerprint="fp_a", recorded_at="2026-01-01T00:00:00.000Z",
              duration_ms=10.0)
B = Recording(200, {"content-type": "application/json", "x-request-id": "req_2"},
              b'{"answer": "B"}', system_fingerprint="fp_b", recorded_at="2026-01-02T00:00:00.000Z",
              drift=Drift.FINGERPRINT)
STREAM = Recording(200, {"content-type": "text/event-stream"},
                   events=(SseEvent(1.0, b"data: {}\n\n"), SseEvent(2.0, b"data: [DONE]\n\n")),
                   system_fingerprint="fp_a", recorded_at="2026-01-01T00:00:00.000Z")


def _entry(*recordings: Recording) -> Entry:
    entry = Entry(KEY, "chat.completions", {"route": "chat/completions"})
    for recording in recordings:
        entry = entry.add(recording)
    return entry


def _copy(recording: Recording, at: str, verified: str | None = None) -> Recording:
    """What a refresh of an older version stored for the same answer."""
    return replace(recording, recorded_at=at, duration_ms=99.0, drift=Drift.SAME,
                   verified_at=verified)


def _replayed(entry: Entry) -> dict[str, bytes]:
    """What each policy replays."""
    chosen = {policy: select(entry, policy).recording for policy in (PINNED, LATEST, "fp_a", "fp_b")}
    return {policy: recording.body for policy, recording in chosen.items() if recording}


def test_copies_go_the_first_stays_with_the_latest_verification() -> None:
    entry = _entry(A, B, _copy(A, "2026-03-01T00:00:00.000Z"),
                   _copy(A, "2026-02-15T00:00:00.000Z", verified="2026-04-01T00:00:00.000Z"),
                   _copy(B, "2026-02-01T00:00:00.000Z"))
    result = compact(entry)
    assert result.dropped == 3
    kept_a, kept_b = result.entry.recordings
    assert kept_a == replace(A, verified_at="2026-04-01T00:00:00.000Z")
    assert kept_b == replace(B, verified_at="2026-02-01T00:00:00.000Z")
    assert result.entry.pinned_fingerprint == "fp_a"
    assert _replayed(result.entry) == _replayed(entry)


def test_the_last_copy_stays_when_latest_would_replay_another_answer_without_it() -> None:
    last = _copy(A, "2026-03-01T00:00:00.000Z")
    entry = _entry(A, _copy(A, "2026-02-01T00:00:00.000Z"), B, _copy(B, "2026-02-15T00:00:00.000Z"),
                   last)
    result = compact(entry)
    assert result.dropped == 2
    assert result.entry.recordings == (replace(A, verified_at="2026-03-01T00:00:00.000Z"),
                                       replace(B, verified_at="2026-02-15T00:00:00.000Z"), last)
    assert _replayed(result.entry) == _replayed(entry)


def test_a_stream_is_a_copy_when_its_events_bytes_are_whatever_their_timing() -> None:
    late = replace(STREAM, events=tuple(replace(e, at_ms=e.at_ms * 3) for e in STREAM.events or ()),
                   recorded_at="2026-05-01T00:00:00.000Z")
    result = compact(_entry(STREAM, late))
    assert result.dropped == 1 and result.entry.recordings[0].events == STREAM.events
    assert result.entry.recordings[0].verified_at == "2026-05-01T00:00:00.000Z"


def test_anything_else_that_differs_keeps_both() -> None:
    differing = [
        replace(A, headers={**A.headers, "x-request-id": "req_3"}),  # another header value
        replace(A, body=A.body + b"\n"),  # one byte more
        replace(A, status=201),
        replace(A, system_fingerprint="fp_other"),
        replace(STREAM, events=(SseEvent(1.0, b"data: {}\n\n"),)),
    ]
    for other in differing:
        base = STREAM if other.events is not None else A
        result = compact(_entry(base, other))
        assert result.dropped == 0 and result.entry.recordings == (base, other), other


def test_a_sequence_is_left_as_it_is() -> None:
    sequence = _entry().as_sequence((A, _copy(A, "2026-02-01T00:00:00.000Z"), A))
    result = compact(sequence)
    assert result.dropped == 0 and result.entry is sequence


A_OTHER = replace(A, body=b'{"answer": "A, said otherwise"}')  # output drift under fp_a


@given(st.lists(st.tuples(st.sampled_from([A, B, A_OTHER]),
                          st.integers(min_value=1, max_value=28)), min_size=1, max_size=12))
def test_every_policy_replays_what_it_did_and_only_copies_go(
        picks: list[tuple[Recording, int]]) -> None:
    entry = _entry(*(_copy(recording, f"2026-02-{day:02d}T00:00:00.000Z")
                     for recording, day in picks))
    result = compact(entry)
    assert _replayed(result.entry) == _replayed(entry)
    assert result.dropped == len(entry.recordings) - len(result.entry.recordings)
    kept = [answer_identity(recording) for recording in result.entry.recordings]
    assert set(kept) == {answer_identity(recording) for recording in entry.recordings}
    assert len(set(kept[:-1])) == len(kept) - 1  # one copy at most, and only to stay last
