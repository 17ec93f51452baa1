"""Matching rules: what of a request the key ignores, masks or redacts. Pure.

A prompt that holds today's date, a request id or a temporary path changes every run; the key
must not. Three kinds of rule, applied to the canonical request's JSON body before keying:

- **Masks** (`--mask`) replace what a pattern matches inside string values with a placeholder:
  `iso-date` turns "Today is 2026-11-21." into "Today is <iso-date>.". A mask may be limited to
  a path (`messages[*].content:iso-date`) and a regex may name its replacement
  (`order-\\d+=order-N`).
- **Ignored paths** (`--ignore-path`) drop nested fields: `metadata.trace_id`,
  `messages[*].name`. What decides the answer can never be ignored (`seed`, `model`, the
  messages and their content, `input`, `prompt`, `stream`); it can be masked.
- **Redactions** (`--redact`) replace what a pattern matches with `[REDACTED]`, in the key, the
  stored request and the stored answers alike, so that redaction and matching agree: a
  redacted prompt still matches its recording, and two prompts that differ only in redacted
  text share one.

The stored canonical request shows the placeholders, and the rules in force are stored with
each recorded entry (`Rules.describe()`), so a replay under other rules can say so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

REDACTED = "[REDACTED]"

# Built-in masks: a name users can remember, and the placeholder it leaves.
BUILTIN_MASKS: Final[Mapping[str, str]] = {
    "iso-datetime": r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?"
                    r"(?:Z|[+-]\d{2}:?\d{2})?",
    "iso-date": r"\b\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b",
    "uuid": r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",
    "unix-ts": r"\b1[0-9]{9}(?:[0-9]{3})?\b",  # seconds or milliseconds, 2001 to 2286
    "hex-id": r"\b[0-9a-fA-F]{16,}\b",
    "tmp-path": r"(?:/tmp|/var/folders|/private/var/folders|[A-Za-z]:\\(?:[^\\\s]+\\)*Temp)"
                r"(?:[/\\][^\s\"'<>|]*)?",
}
BUILTIN_REDACTIONS: Final[Mapping[str, str]] = {
    "email": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    "phone": r"(?<![\w+])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?(?:[ .-]?\d{2,4}){2,3}(?!\w)",
}

# What decides the answer is never ignored (masking it is allowed): these fields and everything
# under them, and the messages list and each message as a whole (a message's `name` may go).
PROTECTED_TREES: Final = ("seed", "model", "messages[*].content", "messages[*].role", "input",
                          "prompt", "stream", "instructions")
PROTECTED_PATHS: Final = (*PROTECTED_TREES, "messages", "messages[*]")

_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\[(?:\*|\d+)\]|\.[A-Za-z_][\w-]*)*")
_STEP = re.compile(r"\.?([A-Za-z_][\w-]*)|\[(\*|\d+)\]")
_REGEX_CHARACTERS = set("()[]{}?*+|^$\\")


class RuleError(ValueError):
    """A rule that cannot be used, with what to write instead."""


class Wildcard:
    """The `[*]` step of a path: every element of a list."""

    def __repr__(self) -> str:
        return "[*]"


EVERY: Final = Wildcard()
Step = str | int | Wildcard


@dataclass(frozen=True)
class Path:
    """`messages[*].content`: field names, list positions and `[*]` (every element)."""

    steps: tuple[Step, ...]
    source: str

    def __str__(self) -> str:
        return self.source

    def covers(self, location: tuple[str | int, ...]) -> bool:
        """Whether a value at `location` is this path or lies under it."""
        if len(location) < len(self.steps):
            return False
        return all(_step_matches(step, part) for step, part in zip(self.steps, location,
                                                                   strict=False))


def _step_matches(step: Step, part: str | int) -> bool:
    if step is EVERY:
        return isinstance(part, int)
    return step == part


def parse_path(text: str) -> Path:
    cleaned = text.strip().removeprefix("body.")
    if not _PATH.fullmatch(cleaned):
        raise RuleError(f"{text!r} is not a path: write field names joined by dots, with [*] "
                        "for every element of a list or [N] for one, e.g. messages[*].name or "
                        "metadata.trace_id.")
    steps: list[Step] = []
    for match in _STEP.finditer(cleaned):
        name, index = match.groups()
        steps.append(name if name is not None else EVERY if index == "*" else int(index))
    return Path(tuple(steps), cleaned)


@dataclass(frozen=True)
class Mask:
    pattern: re.Pattern[str]
    placeholder: str
    path: Path | None
    source: str  # as the user wrote it, for messages and for the stored rules


def parse_mask(text: str) -> Mask:
    """`NAME`, `REGEX`, `REGEX=REPLACEMENT`, each optionally as `PATH:...`."""
    path: Path | None = None
    rule = text
    head, colon, rest = text.partition(":")
    if colon and rest and _PATH.fullmatch(head.strip()):
        path, rule = parse_path(head), rest
    if rule in BUILTIN_MASKS:
        return Mask(re.compile(BUILTIN_MASKS[rule]), f"<{rule}>", path, text)
    expression, placeholder = rule, "<masked>"
    left, equals, right = rule.rpartition("=")
    if equals and left and right and not _REGEX_CHARACTERS & set(right):
        expression, placeholder = left, right
    return Mask(_compile(expression, text, "--mask"), placeholder, path, text)


@dataclass(frozen=True)
class Redaction:
    pattern: re.Pattern[str]
    source: str


def parse_redaction(text: str) -> Redaction:
    expression = BUILTIN_REDACTIONS.get(text, text)
    return Redaction(_compile(expression, text, "--redact"), text)


def _compile(expression: str, text: str, option: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(expression)
    except re.error as exc:
        raise RuleError(f"{option} {text!r} is not a valid regular expression ({exc}).") from exc
    if pattern.match(""):
        raise RuleError(f"{option} {text!r} matches the empty string, so it would rewrite every "
                        "string; make it match at least one character.")
    return pattern


@dataclass(frozen=True)
class Rules:
    masks: tuple[Mask, ...] = ()
    ignored: tuple[Path, ...] = ()
    redactions: tuple[Redaction, ...] = ()

    @classmethod
    def parse(cls, masks: Iterable[str] = (), ignore_paths: Iterable[str] = (),
              redactions: Iterable[str] = ()) -> Rules:
        ignored = tuple(parse_path(text) for text in ignore_paths)
        for path in ignored:
            protected = _protected(path)
            if protected is not None:
                raise RuleError(
                    f"--ignore-path {path} would leave {protected} out of the key, and it decides "
                    f"the answer. Mask what changes inside it instead, e.g. --mask "
                    f"'{protected}:iso-date'.")
        return cls(tuple(parse_mask(text) for text in masks), ignored,
                   tuple(parse_redaction(text) for text in redactions))

    def merged(self, more: Rules) -> Rules:
        """These rules and `more`'s (a cassette's own rules add to the shared ones)."""
        return Rules(self.masks + more.masks, self.ignored + more.ignored,
                     self.redactions + more.redactions)

    def __bool__(self) -> bool:
        return bool(self.masks or self.ignored or self.redactions)

    def describe(self) -> dict[str, list[str]]:
        """The rules as written, stored with what they keyed."""
        described = {"mask": [m.source for m in self.masks],
                     "ignore_path": [p.source for p in self.ignored],
                     "redact": [r.source for r in self.redactions]}
        return {name: values for name, values in described.items() if values}

    @property
    def redaction_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(redaction.pattern for redaction in self.redactions)

    def redact_text(self, text: str) -> str:
        for redaction in self.redactions:
            text = redaction.pattern.sub(REDACTED, text)
        return text

    def apply(self, body: Any) -> Applied:
        """The body as keyed: redacted, with ignored paths dropped and masks applied, and where
        each rule changed something (for miss explanations)."""
        touched: dict[tuple[str | int, ...], Any] = {}
        dropped: list[str] = []
        result = _walk(body, (), self, touched, dropped)
        return Applied(result, touched, tuple(dropped))


def _protected(path: Path) -> str | None:
    """The protected path that ignoring `path` would cut into, or None."""
    for text in PROTECTED_PATHS:
        protected = parse_path(text)
        # Ignoring a protected path, or anything that contains one, removes it ...
        if _is_prefix(path.steps, protected.steps):
            return text
        # ... and ignoring anything inside a protected tree changes it.
        if text in PROTECTED_TREES and _is_prefix(protected.steps, path.steps):
            return text
    return None


def _is_prefix(shorter: tuple[Step, ...], longer: tuple[Step, ...]) -> bool:
    return len(shorter) <= len(longer) and all(
        _same_step(a, b) for a, b in zip(shorter, longer, strict=False))


def _same_step(ignored: Step, protected: Step) -> bool:
    if ignored is EVERY or protected is EVERY:
        return isinstance(ignored, int) or isinstance(protected, int) or ignored is protected
    return ignored == protected


@dataclass(frozen=True)
class Applied:
    body: Any
    # Where a mask or redaction changed a string: location -> the value before the rules.
    changed: Mapping[tuple[str | int, ...], Any] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()  # ignored paths that removed something


def _walk(value: Any, location: tuple[str | int, ...], rules: Rules,
          changed: dict[tuple[str | int, ...], Any], dropped: list[str]) -> Any:
    if isinstance(value, dict):
        kept = {}
        for name, item in value.items():
            child = (*location, name)
            ignoring = next((p for p in rules.ignored if p.covers(child)
                             and len(p.steps) == len(child)), None)
            if ignoring is not None:
                dropped.append(ignoring.source)
                continue
            kept[name] = _walk(item, child, rules, changed, dropped)
        return kept
    if isinstance(value, list):
        result = []
        for index, item in enumerate(value):
            child = (*location, index)
            if any(p.covers(child) and len(p.steps) == len(child) for p in rules.ignored):
                dropped.append(next(p.source for p in rules.ignored if p.covers(child)))
                continue
            result.append(_walk(item, child, rules, changed, dropped))
        return result
    if isinstance(value, str):
        text = rules.redact_text(value)
        for mask in rules.masks:
            if mask.path is None or mask.path.covers(location):
                text = mask.pattern.sub(mask.placeholder, text)
        if text != value:
            changed[location] = value
        return text
    return value


def compare_rules(recorded: Mapping[str, list[str]] | None, current: Rules) -> str | None:
    """How the rules a key was recorded under (`Rules.describe()`, as stored) differ from
    today's, or None when they agree."""
    before = {name: list(values) for name, values in (recorded or {}).items()
              if isinstance(values, list)}
    now = current.describe()
    if before == now:
        return None
    parts = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name, []), now.get(name, [])
        added = [rule for rule in new if rule not in old]
        removed = [rule for rule in old if rule not in new]
        option = "--" + name.replace("_", "-")
        parts += [f"{option} {rule!r} is new" for rule in added]
        parts += [f"{option} {rule!r} was in force when recorded and is not now"
                  for rule in removed]
    return "; ".join(parts)


Normaliser = Callable[[dict[str, Any]], dict[str, Any]]
