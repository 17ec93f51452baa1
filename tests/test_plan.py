"""The decision core, without a socket: every combination of its inputs."""

from __future__ import annotations

import itertools

import pytest
from replay_proxy.core.cassette import Drift, Entry, Recording
from replay_proxy.core.modes import Mode
from replay_proxy.core.plan import (
    FingerprintNotRecorded,
    Forward,
    Miss,
    NotRecorded,
    Passthrough,
    Position,
    Replay,
    SequenceExhausted,
    Storage,
    plan,
    stored_entry,
)


def recording(fingerprint: str | None, text: str = "x") -> Recording:
    return Recording(200, {}, body=f'{{"answer":"{text}"}}'.encode(),
                     system_fingerprint=fingerprint, recorded_at="2026-01-01T00:00:00.000Z")


EMPTY = Entry("k" * 64, "label", {})
ONE = EMPTY.add(recording("fp_a", "first"))
TWO = ONE.add(recording("fp_b", "second"))
SEQUENCE = EMPTY.as_sequence((recording(None, "validating"), recording(None, "in_progress"),
                              recording(None, "completed")))
ENTRIES = {"none": None, "empty": EMPTY, "one": ONE, "two": TWO, "sequence": SEQUENCE}
MODES = [Mode.RECORD, Mode.REPLAY, Mode.REFRESH, Mode.PASSTHROUGH]
POLICIES = ["pinned", "latest", "fp_b", "fp_unknown"]
OCCURRENCES = [None, 1, 2, 3, 4]
METHODS = ["GET", "POST", "DELETE"]
ALL = list(itertools.product(MODES, ENTRIES, POLICIES, OCCURRENCES, METHODS))


@pytest.mark.parametrize(("mode", "entry_name", "policy", "occurrence", "method"), ALL)
def test_invariants_hold_for_every_input(mode: Mode, entry_name: str, policy: str,
                                         occurrence: int | None, method: str) -> None:
    entry = ENTRIES[entry_name]
    decided = plan(mode, entry, fingerprint=policy, occurrence=occurrence, method=method)
    recordings = entry.recordings if entry is not None else ()
    if mode is Mode.PASSTHROUGH:
        assert isinstance(decided, Passthrough)
        return
    assert not isinstance(decided, Passthrough)
    if mode is Mode.REPLAY:  # never reaches the upstream
        assert isinstance(decided, Replay | Miss)
    if mode is Mode.REFRESH:  # always asks the upstream
        assert isinstance(decided, Forward)
    if isinstance(decided, Replay):
        assert any(decided.recording is kept for kept in recordings)
    if occurrence is None:
        assert not isinstance(decided, Forward) or decided.storage is Storage.ALTERNATIVE
        assert not isinstance(decided, Replay) or decided.position is None
        return
    # A sequenced key: the n-th request gets the n-th answer while there is one.
    assert not isinstance(decided, Forward) or decided.storage is not Storage.ALTERNATIVE
    if isinstance(decided, Replay | Forward):
        assert decided.position == Position(occurrence, len(recordings))
    if mode is not Mode.REFRESH and occurrence <= len(recordings):
        assert isinstance(decided, Replay) and decided.recording is recordings[occurrence - 1]
    if mode is Mode.RECORD:
        assert not isinstance(decided, Miss)


def _summary(decided: object) -> object:
    match decided:
        case Replay(recording=kept, position=position):
            return ("replay", kept.body, position.header() if position else None)
        case Miss(reason=reason):
            return ("miss", type(reason).__name__)
        case Forward(storage=storage, classify_drift=classify):
            return ("forward", storage.value, classify)
        case Passthrough():
            return ("passthrough",)
    raise AssertionError(decided)


FIRST, SECOND = b'{"answer":"first"}', b'{"answer":"second"}'
VALIDATING, COMPLETED = b'{"answer":"validating"}', b'{"answer":"completed"}'


@pytest.mark.parametrize(("mode", "entry_name", "policy", "occurrence", "method", "expected"), [
    # Generation keys: one answer per key, chosen by fingerprint.
    (Mode.RECORD, "none", "pinned", None, "POST", ("forward", "alternative", False)),
    (Mode.RECORD, "empty", "pinned", None, "POST", ("forward", "alternative", False)),
    (Mode.RECORD, "two", "pinned", None, "POST", ("replay", FIRST, None)),
    (Mode.REPLAY, "two", "latest", None, "POST", ("replay", SECOND, None)),
    (Mode.REPLAY, "two", "fp_b", None, "POST", ("replay", SECOND, None)),
    (Mode.REPLAY, "two", "fp_unknown", None, "POST", ("miss", "FingerprintNotRecorded")),
    (Mode.RECORD, "two", "fp_unknown", None, "POST", ("miss", "FingerprintNotRecorded")),
    (Mode.REPLAY, "none", "pinned", None, "POST", ("miss", "NotRecorded")),
    (Mode.REFRESH, "none", "pinned", None, "POST", ("forward", "alternative", False)),
    (Mode.REFRESH, "one", "pinned", None, "POST", ("forward", "alternative", True)),
    # Sequenced keys: in order; past the end a read repeats the last answer, a write misses.
    (Mode.REPLAY, "sequence", "pinned", 1, "POST", ("replay", VALIDATING, "1/3")),
    (Mode.REPLAY, "sequence", "pinned", 3, "GET", ("replay", COMPLETED, "3/3")),
    (Mode.REPLAY, "sequence", "pinned", 4, "GET", ("replay", COMPLETED, "4/3")),
    (Mode.REPLAY, "sequence", "pinned", 4, "POST", ("miss", "SequenceExhausted")),
    (Mode.REPLAY, "sequence", "pinned", 4, "DELETE", ("miss", "SequenceExhausted")),
    (Mode.REPLAY, "none", "pinned", 1, "GET", ("miss", "NotRecorded")),
    (Mode.RECORD, "sequence", "pinned", 2, "GET", ("replay", b'{"answer":"in_progress"}', "2/3")),
    (Mode.RECORD, "sequence", "pinned", 4, "GET", ("forward", "next", False)),
    (Mode.RECORD, "none", "pinned", 1, "POST", ("forward", "next", False)),
    (Mode.REFRESH, "sequence", "pinned", 2, "GET", ("forward", "restart", False)),
])
def test_the_plan_table(mode: Mode, entry_name: str, policy: str, occurrence: int | None,
                        method: str, expected: object) -> None:
    decided = plan(mode, ENTRIES[entry_name], fingerprint=policy, occurrence=occurrence,
                   method=method)
    assert _summary(decided) == expected


def test_misses_carry_their_reasons_as_data() -> None:
    miss = plan(Mode.REPLAY, TWO, fingerprint="fp_z", occurrence=None, method="POST")
    assert miss == Miss(FingerprintNotRecorded("fp_z", ("fp_a", "fp_b")))
    exhausted = plan(Mode.REPLAY, SEQUENCE, fingerprint="pinned", occurrence=5, method="post")
    assert exhausted == Miss(SequenceExhausted("POST", Position(5, 3)))
    assert plan(Mode.REPLAY, None, fingerprint="pinned", occurrence=None,
                method="GET") == Miss(NotRecorded())


def test_an_unresolved_mode_or_a_zeroth_occurrence_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="resolved mode"):
        plan(Mode.AUTO, None, fingerprint="pinned", occurrence=None, method="GET")
    with pytest.raises(ValueError, match="counts from 1"):
        plan(Mode.RECORD, None, fingerprint="pinned", occurrence=0, method="GET")


def test_storing_follows_the_plan() -> None:
    fresh = recording(None, "new")
    appended = stored_entry(Storage.NEXT_IN_SEQUENCE, SEQUENCE, EMPTY, fresh, Position(4, 3))
    assert appended.sequence and appended.recordings[-1] is fresh and len(appended.recordings) == 4
    first = stored_entry(Storage.NEXT_IN_SEQUENCE, None, EMPTY, fresh, Position(1, 0))
    assert first.sequence and first.recordings == (fresh,) and first.pinned_fingerprint is None
    restarted = stored_entry(Storage.RESTART_AT, SEQUENCE, EMPTY, fresh, Position(2, 3))
    assert restarted.recordings == (SEQUENCE.recordings[0], fresh)
    again = stored_entry(Storage.RESTART_AT, SEQUENCE, EMPTY, fresh, Position(1, 3))
    assert again.recordings == (fresh,)
    alternative = stored_entry(Storage.ALTERNATIVE, ONE, EMPTY, recording("fp_c"), None)
    assert not alternative.sequence and len(alternative.recordings) == 2
    assert alternative.pinned_fingerprint == "fp_a"


def test_a_refresh_with_the_same_answer_marks_the_recording_verified() -> None:
    same = Recording(200, {}, body=ONE.recordings[0].body, system_fingerprint="fp_a",
                     recorded_at="2026-02-02T00:00:00.000Z", drift=Drift.SAME)
    kept = stored_entry(Storage.ALTERNATIVE, ONE, EMPTY, same, None)
    assert len(kept.recordings) == 1
    assert kept.recordings[0].verified_at == "2026-02-02T00:00:00.000Z"
    assert kept.recordings[0].body == ONE.recordings[0].body
