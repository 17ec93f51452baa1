"""Rows and text for the inspection commands (ls, show, drift, stats). Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from ..core import fingerprints
from ..core.cassette import Drift, Entry, Recording, resource_status
from ..store import StoredItem

DRIFTS = (Drift.FINGERPRINT, Drift.OUTPUT)


def ls_row(item: StoredItem, last_used: Mapping[tuple[str, str], str]) -> dict[str, Any]:
    row: dict[str, Any] = {"cassette": item.cassette, "key": item.key, "size": item.size,
                           "last_used": last_used.get((item.cassette, item.key))}
    if item.entry is None:
        return {**row, "error": item.error.message if item.error else "unreadable"}
    entry = item.entry
    body = entry.request.get("body") if isinstance(entry.request.get("body"), dict) else {}
    assert isinstance(body, dict)
    return {
        **row,
        "provider": entry.request.get("provider"),
        "route": entry.request.get("route"),
        "model": body.get("model") or entry.request.get("deployment"),
        # Whether the answer was recorded as a stream of events (what replay sends back).
        "stream": any(recording.events is not None for recording in entry.recordings),
        "seed": body.get("seed"),
        "temperature": body.get("temperature"),
        "fingerprints": entry.fingerprints(),
        "pinned": entry.pinned_fingerprint,
        "recordings": len(entry.recordings),
        "confirmed": entry.last_confirmed() or None,  # last recorded, or verified the same
        "sequence": [_sequence_step(recording) for recording in entry.recordings]
        if entry.sequence else None,
    }


def _sequence_step(recording: Recording) -> str:
    """One answer of a sequence in a few characters: its status, and the resource's."""
    status = resource_status(recording)
    return f"{recording.status}" + (f":{status}" if status else "")


def collapse(steps: list[str]) -> list[str]:
    """`a, b, b, b, c` -> `a, b x3, c`: a poll loop reads as its states."""
    runs: list[tuple[str, int]] = []
    for step in steps:
        if runs and runs[-1][0] == step:
            runs[-1] = (step, runs[-1][1] + 1)
        else:
            runs.append((step, 1))
    return [step if count == 1 else f"{step} x{count}" for step, count in runs]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return ",".join(str(v) for v in value) or "-"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in
              enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def drift_rows(items: Iterable[StoredItem]) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        entry = item.entry
        if entry is None:
            continue
        pinned = fingerprints.select(entry, fingerprints.PINNED).recording
        for recording in entry.recordings:
            if recording.drift not in DRIFTS:
                continue
            old_text = fingerprints.answer_text(pinned) if pinned else ""
            rows.append({
                "cassette": item.cassette, "key": entry.key, "route": entry.request.get("route"),
                "drift": recording.drift,
                "fingerprint_old": pinned.system_fingerprint if pinned else None,
                "fingerprint_new": recording.system_fingerprint,
                "recorded_at": recording.recorded_at,
                "diff": fingerprints.word_diff(old_text, fingerprints.answer_text(recording)),
            })
    return rows


def show_text(cassette: str, entry: Entry) -> str:
    lines = [f"cassette  {cassette}", f"key       {entry.key}",
             f"route     {entry.request.get('method')} {entry.request.get('route')}",
             f"pinned    {entry.pinned_fingerprint}", "request:",
             orjson.dumps(entry.request, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
             .decode()]
    if entry.sequence:
        lines.append(f"sequence  {len(entry.recordings)} answers, replayed in order (the n-th "
                     "identical request of a session gets the n-th)")
    for index, recording in enumerate(entry.recordings):
        kind = f"stream of {len(recording.events)} events" if recording.events is not None \
            else f"{len(recording.body)} bytes"
        if entry.sequence:
            status = resource_status(recording)
            lines.append(f"occurrence {index + 1}: status {recording.status}"
                         + (f", resource {status}" if status else "")
                         + f", {kind}, recorded {recording.recorded_at}")
            continue
        lines.append(f"recording {index}: status {recording.status}, {kind}, fingerprint "
                     f"{recording.system_fingerprint}, recorded {recording.recorded_at}"
                     + (f", {recording.drift}" if recording.drift else "")
                     + (f", verified {recording.verified_at}" if recording.verified_at else ""))
        text = fingerprints.answer_text(recording)
        if text:
            lines.append(f"  answer: {text if len(text) < 400 else text[:400] + '...'}")
    return "\n".join(lines)


def totals(runs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    summed: dict[str, int] = {}
    for run in runs:
        for name, value in (run.get("totals") or {}).items():
            summed[name] = summed.get(name, 0) + int(value)
    return summed
