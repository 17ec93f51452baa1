"""Which recording replays, and how a fresh answer compares with what was recorded. Pure."""

from __future__ import annotations

import pytest
from replay_proxy.core import fingerprints
from replay_proxy.core.cassette import Drift, Entry, Recording, SseEvent


def body(fingerprint: str | None, text: str, *, status: int = 200,
         created: int = 1) -> Recording:
    payload = (f'{{"id":"chatcmpl-{created}","created":{created},'
               f'"system_fingerprint":{"null" if fingerprint is None else repr(fingerprint)},'
               f'"choices":[{{"message":{{"content":"{text}"}}}}]}}').replace("'", '"')
    return Recording(status, {}, body=payload.encode(), system_fingerprint=fingerprint)


def stream(fingerprint: str, *pieces: str) -> Recording:
    events = tuple(SseEvent(float(i), f'data: {{"id":"c{i}","choices":[{{"delta":{{"content":'
                                      f'"{piece}"}}}}]}}\n\n'.encode())
                   for i, piece in enumerate(pieces))
    return Recording(200, {}, events=(*events, SseEvent(9, b"data: [DONE]\n\n")),
                     system_fingerprint=fingerprint)


ENTRY = Entry("k" * 64, "chat", {}).add(body("fp_a", "one")).add(body("fp_b", "two")) \
    .add(body("fp_a", "three"))


@pytest.mark.parametrize(("policy", "answer", "fingerprint"), [
    ("pinned", "one", "fp_a"), ("latest", "three", "fp_a"), ("fp_b", "two", "fp_b"),
])
def test_select_by_policy(policy: str, answer: str, fingerprint: str) -> None:
    selection = fingerprints.select(ENTRY, policy)
    assert selection.recording is not None
    assert fingerprints.answer_text(selection.recording) == answer
    assert selection.fingerprint == fingerprint


def test_select_explains_an_unrecorded_fingerprint_and_an_empty_key() -> None:
    missing = fingerprints.select(ENTRY, "fp_z")
    assert missing.recording is None and "fp_z" in missing.reason and "fp_a, fp_b" in missing.reason
    assert fingerprints.select(Entry("k", "l", {}), "pinned").reason == "the key has no recordings"


def test_a_pin_to_a_fingerprint_no_longer_recorded_falls_back_to_the_first() -> None:
    from dataclasses import replace

    repinned = replace(ENTRY, pinned_fingerprint="fp_gone")
    chosen = fingerprints.select(repinned, "pinned").recording
    assert chosen is ENTRY.recordings[0]


def test_classify_ignores_ids_and_timestamps_but_not_the_answer() -> None:
    before = body("fp_a", "same words", created=1)
    assert fingerprints.classify(before, body("fp_a", "same words", created=2)) is Drift.SAME
    assert fingerprints.classify(before, body("fp_b", "same words")) is Drift.FINGERPRINT
    assert fingerprints.classify(before, body("fp_a", "other words")) is Drift.OUTPUT
    assert fingerprints.classify(None, body("fp_a", "x")) is Drift.SAME


def test_classify_against_prefers_the_latest_recording_of_the_fresh_fingerprint() -> None:
    # Pinned fp_a; fp_b last said "two": the same words again are the same, new ones drift.
    assert fingerprints.classify_against(ENTRY, body("fp_b", "two")) is Drift.SAME
    assert fingerprints.classify_against(ENTRY, body("fp_b", "new")) is Drift.OUTPUT
    assert fingerprints.classify_against(ENTRY, body("fp_c", "one")) is Drift.FINGERPRINT
    assert fingerprints.baseline(ENTRY, "fp_a") is ENTRY.recordings[2]


def test_stream_answers_are_the_text_they_add_up_to() -> None:
    assert fingerprints.answer_text(stream("fp_a", "Hel", "lo")) == "Hello"
    assert fingerprints.classify(stream("fp_a", "Hel", "lo"), stream("fp_a", "He", "llo")) \
        is Drift.SAME
    assert fingerprints.classify(stream("fp_a", "Hello"), stream("fp_a", "Bye")) is Drift.OUTPUT


def test_an_error_answer_differs_from_a_success_with_the_same_text() -> None:
    assert fingerprints.classify(body("fp_a", "x"), body("fp_a", "x", status=500)) \
        is Drift.OUTPUT


def test_word_diff_and_similarity() -> None:
    assert fingerprints.word_diff("the quick fox", "the slow fox") == "the [-quick-] {+slow+} fox"
    assert fingerprints.similarity("a b c d", "a b c d") == 1.0
    assert fingerprints.similarity("a b", "c d") == 0.0
