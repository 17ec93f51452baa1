"""Why a request missed: the nearest recorded request and the exact fields that differ. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .canonical import CanonicalRequest
from .plan import FingerprintNotRecorded, SequenceExhausted
from .rules import Rules, compare_rules

_MISSING = object()
_SHOWN = 60  # characters of context kept around the first difference of two strings


@dataclass(frozen=True)
class OptionSpelling:
    """How the user in front of the proxy sets an option, so that advice names what they type:
    `--mode record` to a command-line user, `--replay-mode record` to a pytest user."""

    prefix: str = "--"
    runner: str = "the proxy"

    def flag(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def __call__(self, name: str, value: str) -> str:
        return f"{self.flag(name)} {value}"


COMMAND_LINE = OptionSpelling()
PYTEST_OPTIONS = OptionSpelling("--replay-", "pytest")


@dataclass(frozen=True)
class Difference:
    path: str
    recorded: object  # a JSON value, or _MISSING where the field is absent
    requested: object

    def render(self) -> str:
        recorded, requested = _show_pair(self.recorded, self.requested)
        return f"{self.path}: {recorded} -> {requested}"


@dataclass(frozen=True)
class Nearest:
    label: str
    key: str
    differences: tuple[Difference, ...]
    rules: Mapping[str, list[str]] | None = None  # the rules it was keyed under, as stored


@dataclass(frozen=True)
class RuleNotes:
    """What today's matching rules did to the request that missed: the rules, each body
    location a mask or redaction changed (with its value before), and the ignored paths that
    removed something."""

    rules: Rules
    changed: Mapping[tuple[str | int, ...], Any]
    dropped: tuple[str, ...] = ()

    def before_rules(self, path: str) -> object:
        """The value at a difference's path before the rules changed it, or _MISSING."""
        for location, value in self.changed.items():
            if _location_path(location) == path:
                return value
        return _MISSING

    def ignoring(self, path: str) -> str | None:
        """The --ignore-path that left this path out of the key, if one did."""
        return next((ignored.source for ignored in self.rules.ignored
                     if _location_path(ignored.steps) == path
                     or ignored.covers(_path_location(path))), None)


def _location_path(location: Iterable[object]) -> str:
    """("messages", 0, "content") -> "messages[0].content", as a Difference names its path."""
    text = ""
    for step in location:
        if isinstance(step, int) or repr(step) == "[*]":
            text += f"[{step}]" if isinstance(step, int) else "[*]"
        else:
            text += f".{step}" if text else str(step)
    return text


def _path_location(path: str) -> tuple[str | int, ...]:
    steps: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        steps.append(int(index) if index else name)
    return tuple(steps)


def differences(recorded: object, requested: object, path: str = "") -> list[Difference]:
    if isinstance(recorded, Mapping) and isinstance(requested, Mapping):
        found: list[Difference] = []
        for name in sorted(set(recorded) | set(requested), key=str):
            child = f"{path}.{name}" if path else str(name)
            found += differences(recorded.get(name, _MISSING), requested.get(name, _MISSING), child)
        return found
    if isinstance(recorded, list) and isinstance(requested, list):
        found = []
        for index in range(max(len(recorded), len(requested))):
            left = recorded[index] if index < len(recorded) else _MISSING
            right = requested[index] if index < len(requested) else _MISSING
            found += differences(left, right, f"{path}[{index}]")
        return found
    if recorded == requested and type(recorded) is type(requested):
        return []
    return [Difference(path or "(request)", recorded, requested)]


# (label, key, canonical request[, the matching rules it was keyed under, as stored])
Candidate = (tuple[str, str, CanonicalRequest]
             | tuple[str, str, CanonicalRequest, Mapping[str, list[str]] | None])


def nearest(requested: CanonicalRequest, candidates: Iterable[Candidate]) -> Nearest | None:
    """The candidate (label, key, canonical request[, the rules it was keyed under]) with the
    fewest differing fields."""
    best: Nearest | None = None
    for candidate in candidates:
        label, key, recorded = candidate[:3]
        rules = candidate[3] if len(candidate) > 3 else None
        found = tuple(differences(_view(recorded), _view(requested)))
        score = _score(found)
        if best is None or score < _score(best.differences):
            best = Nearest(label, key, found, rules)
    return best


# How many fields of a request are indexed to find its nearest recordings (the rest still
# count in the exact comparison of the few candidates the index proposes).
INDEXED_FIELDS = 64

Bucket = tuple[str, str, str, str, str]


def bucket(canonical: CanonicalRequest) -> Bucket:
    """Where a request is indexed: its provider, method, route, deployment and model. The
    nearest recording is nearly always in the same bucket, and a bucket is a small part of a
    large cassette."""
    view = _view(canonical)
    return (str(view.get("provider")), str(view.get("method")), str(view.get("route")),
            str(view.get("deployment")), str(view.get("model")))


def features(canonical: CanonicalRequest) -> tuple[int, ...]:
    """Hashes of a request's fields, two levels deep (`temperature`, `messages[0]`, ...), at
    most INDEXED_FIELDS: two requests share a feature exactly when they agree on that field, so
    the recordings sharing the most features with a request are its nearest candidates. The
    hashes hold for one process (Python's hash of text is salted per process)."""
    found: list[int] = []
    for name, value in _view(canonical).items():
        if isinstance(value, list) and value:
            found += (hash((name, index, _canonical_json(item))) for index, item in
                      enumerate(value))
        elif isinstance(value, Mapping) and value:
            found += (hash((name, str(field), _canonical_json(item))) for field, item in
                      value.items())
        else:
            found.append(hash((name, _canonical_json(value))))
        if len(found) >= INDEXED_FIELDS:
            break
    return tuple(found[:INDEXED_FIELDS])


def _canonical_json(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _view(canonical: CanonicalRequest) -> dict[str, Any]:
    """Body fields at the top level, where users know them (`temperature`, not `body.temperature`)."""
    view = {name: value for name, value in canonical.items() if name != "body"}
    body = canonical.get("body")
    if isinstance(body, Mapping) and "body_kind" not in canonical:  # a JSON object
        for name, value in body.items():
            view[name if name not in view else f"body.{name}"] = value
    else:
        view["body"] = body
    return view


def _score(found: tuple[Difference, ...]) -> tuple[int, int]:
    structural = sum(1 for d in found if d.path in ("provider", "method", "route", "deployment"))
    return structural, len(found)


def explain_miss(cassette: str, canonical: CanonicalRequest, key: str,
                 candidates: Iterable[Candidate], say: OptionSpelling = COMMAND_LINE,
                 indexing: bool = False, notes: RuleNotes | None = None) -> str:
    """`candidates`: the recordings to compare with (the nearest few an index proposes, or
    all); `indexing`: the cassette's recordings are still being listed, none was compared;
    `notes`: what today's matching rules did to this request."""
    route = f"{canonical.get('method')} {canonical.get('route')}"
    where = f" (deployment {canonical['deployment']})" if canonical.get("deployment") else ""
    head = (f"Replay miss: cassette '{cassette}' has no recording for {route}{where} "
            f"with key {key[:16]}.")
    best = None if indexing else nearest(canonical, candidates)
    if indexing:
        tail = (" The cassette's recordings are still being indexed; the next miss names the "
                "nearest one.")
    elif best is None:
        tail = " The cassette is empty."
    else:
        shown = "; ".join(_render(d, notes) for d in best.differences[:8])
        more = len(best.differences) - 8
        if more > 0:
            shown += f"; and {more} more"
        tail = (f" Nearest recorded request: {best.label} (key {best.key[:16]}), which differs in "
                f"{len(best.differences)} field(s): {shown}.")
        if notes is not None:
            changed = compare_rules(best.rules, notes.rules)
            if changed is not None:
                tail += (f" It was keyed under other matching rules than today's ({changed}), "
                         "which changes keys: use the rules it was recorded with, or record "
                         "again.")
    advice = (f" To record it, run {say.runner} with {say('mode', 'record')} (or unset CI for "
              f"{say('mode', 'auto')}); to ignore a field that should not matter, pass "
              f"{say('ignore-field', 'NAME')}.")
    return head + tail + advice


def _render(difference: Difference, notes: RuleNotes | None) -> str:
    """A difference, saying where a matching rule was involved."""
    text = difference.render()
    if notes is None:
        return text
    before = notes.before_rules(difference.path)
    if before is not _MISSING:
        text += f" (today's value before masks and redactions: {_show(before)})"
    ignored = notes.ignoring(difference.path)
    if ignored is not None:
        text += f" (left out of the key by --ignore-path {ignored})"
    return text


def explain_fingerprint(cassette: str, method: str, route: str, key: str,
                        reason: FingerprintNotRecorded, say: OptionSpelling = COMMAND_LINE) -> str:
    known = ", ".join(str(fingerprint) for fingerprint in reason.recorded)
    return (f"Replay miss: cassette '{cassette}' has key {key[:16]} for {method} {route}, but "
            f"no recording has fingerprint {reason.wanted}; recorded: {known}. Choose a recorded "
            "fingerprint, or drop the X-Replay-Fingerprint header / "
            f"{say.flag('fingerprint')} value.")


def explain_exhausted(cassette: str, route: str, key: str, session: str,
                      reason: SequenceExhausted, say: OptionSpelling = COMMAND_LINE) -> str:
    position = reason.position
    return (f"Replay miss: cassette '{cassette}' key {key[:16]}: this is the "
            f"{ordinal(position.occurrence)} identical {reason.method} {route} in session "
            f"'{session}'; {position.recorded} recorded. The code under test makes this request "
            "more often than when it was recorded. To record the extra answer, run "
            f"{say.runner} with {say('mode', 'record')} (it is stored as the next in the "
            "sequence). If the flow runs again on "
            "purpose, start the session again between runs (POST /_replay/reset) or give each "
            "run a session of its own (X-Replay-Session: <id>).")


def ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _show_pair(recorded: object, requested: object) -> tuple[str, str]:
    if isinstance(recorded, str) and isinstance(requested, str):
        return _clip_pair(recorded, requested)
    return _show(recorded), _show(requested)


def _show(value: object) -> str:
    if value is _MISSING:
        return "(absent)"
    if isinstance(value, str):
        text = value if len(value) <= _SHOWN else value[:_SHOWN] + "..."
        return f'"{text}"'
    rendered = repr(value) if not isinstance(value, (dict, list)) else _compact(value)
    return rendered if len(rendered) <= 2 * _SHOWN else rendered[: 2 * _SHOWN] + "..."


def _compact(value: object) -> str:
    return orjson.dumps(value).decode()


def _clip_pair(left: str, right: str) -> tuple[str, str]:
    """Both strings cut to a window around where they first differ (short ones shown whole)."""
    if len(left) <= _SHOWN and len(right) <= _SHOWN:
        return f'"{left}"', f'"{right}"'
    start = 0
    while start < min(len(left), len(right)) and left[start] == right[start]:
        start += 1
    end_left, end_right = len(left), len(right)
    while end_left > start and end_right > start and left[end_left - 1] == right[end_right - 1]:
        end_left -= 1
        end_right -= 1
    context = 12
    begin = max(0, start - context)

    def clip(text: str, end: int) -> str:
        stop = min(len(text), max(end, start) + context)
        if stop - begin > _SHOWN * 2:
            stop = begin + _SHOWN * 2
        prefix = "..." if begin > 0 else ""
        suffix = "..." if stop < len(text) else ""
        return f'"{prefix}{text[begin:stop]}{suffix}"'

    return clip(left, end_left), clip(right, end_right)
