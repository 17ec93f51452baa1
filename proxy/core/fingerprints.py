"""Which recording of a key to replay, and whether a fresh answer drifted from the pinned one.

The provider's `system_fingerprint` names the backend configuration that produced an answer.
A key keeps recordings from several fingerprints; replay picks one by policy, and refresh
compares each new answer with the pinned recording. Pure.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from .cassette import Drift, Entry, Recording
from .sse import event_data


class FingerprintPolicy(StrEnum):
    """The named choices of which recording to replay (`--fingerprint`, a session's, the
    X-Replay-Fingerprint header); any other value is a system_fingerprint to look for."""

    PINNED = "pinned"  # the first recording under the key's pinned fingerprint
    LATEST = "latest"  # the last recording made


# A named policy, or a system_fingerprint value: what `--fingerprint` and its overrides hold.
FingerprintChoice = FingerprintPolicy | str

PINNED = FingerprintPolicy.PINNED
LATEST = FingerprintPolicy.LATEST

# Fields that differ on every call without the answer changing.
_VOLATILE = frozenset({"id", "created", "created_at", "system_fingerprint", "completed_at",
                       "item_id", "response_id", "sequence_number", "obfuscation"})


@dataclass(frozen=True)
class Selection:
    recording: Recording | None
    fingerprint: str | None
    reason: str = ""


def select(entry: Entry, policy: FingerprintChoice) -> Selection:
    """`pinned` (the first recording under the pinned fingerprint), `latest`, or a value."""
    if not entry.recordings:
        return Selection(None, None, "the key has no recordings")
    if policy == LATEST:
        recording = entry.recordings[-1]
        return Selection(recording, recording.system_fingerprint)
    wanted = entry.pinned_fingerprint if policy == PINNED else policy
    for recording in entry.recordings:
        if recording.system_fingerprint == wanted:
            return Selection(recording, wanted)
    if policy == PINNED:
        recording = entry.recordings[0]
        return Selection(recording, recording.system_fingerprint)
    known = ", ".join(str(fp) for fp in entry.fingerprints())
    return Selection(None, None, f"no recording has fingerprint {wanted}; recorded: {known}")


def baseline(entry: Entry, fingerprint: str | None) -> Recording | None:
    """What a fresh answer under `fingerprint` is compared with: the latest recording of that
    fingerprint when the key has one (then a different answer is output drift, the event the
    seed documentation warns about), else the pinned recording."""
    for recording in reversed(entry.recordings):
        if recording.system_fingerprint == fingerprint:
            return recording
    return select(entry, PINNED).recording


def classify(before: Recording | None, fresh: Recording) -> Drift:
    if before is None:
        return Drift.SAME
    if fresh.system_fingerprint != before.system_fingerprint:
        return Drift.FINGERPRINT
    return Drift.SAME if answer(before) == answer(fresh) else Drift.OUTPUT


def classify_against(entry: Entry, fresh: Recording) -> Drift:
    return classify(baseline(entry, fresh.system_fingerprint), fresh)


def answer(recording: Recording) -> Any:
    """What the model said, without ids, timestamps and fingerprints."""
    if recording.events is not None:
        text = answer_text(recording)
        if text:
            return text
        return [_strip(_parse(event_data(e.raw) or b"")) for e in recording.events]
    return (recording.status, _strip(_parse(recording.body)))


def answer_text(recording: Recording) -> str:
    """The generated text, joined across choices or stream deltas; empty when there is none."""
    if recording.events is None:
        return _text_of(_parse(recording.body))
    pieces: list[str] = []
    for event in recording.events:
        data = _parse(event_data(event.raw) or b"")
        if not isinstance(data, dict):
            continue
        if data.get("type") == "response.output_text.delta":
            pieces.append(str(data.get("delta", "")))
        for choice in _objects(data.get("choices")):
            delta = _objects([choice.get("delta")])
            content = delta[0].get("content") if delta else None
            pieces.append(str(content or choice.get("text") or ""))
    return "".join(pieces)


def _text_of(body: object) -> str:
    if not isinstance(body, dict):
        return ""
    pieces: list[str] = []
    for choice in _objects(body.get("choices")):
        message = _objects([choice.get("message")])
        content = message[0].get("content") if message else None
        pieces.append(str(content or choice.get("text") or ""))
    for item in _objects(body.get("output")):
        for content in _objects(item.get("content")):
            if content.get("type") == "output_text":
                pieces.append(str(content.get("text", "")))
    return "".join(pieces)


def _objects(value: object) -> list[dict[str, Any]]:
    """The objects of a JSON list, skipping anything else: answers (from an upstream, or a
    cassette someone edited) need not have the shape the API documents."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def word_diff(old: str, new: str) -> str:
    """`[-removed-]{+added+}` word-level diff, as `git diff --word-diff` shows it."""
    before, after = old.split(), new.split()
    out: list[str] = []
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            out.extend(before[a0:a1])
            continue
        if a1 > a0:
            out.append("[-" + " ".join(before[a0:a1]) + "-]")
        if b1 > b0:
            out.append("{+" + " ".join(after[b0:b1]) + "+}")
    return " ".join(out)


def similarity(left: str, right: str) -> float:
    return difflib.SequenceMatcher(a=left.split(), b=right.split(), autojunk=False).ratio()


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value
