"""The one settings object, built once by the CLI or the pytest plugin and passed down."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .canonical import KeyPolicy
from .defaults import (
    DEFAULT_CACHE_MB,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_ANSWER,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_UPSTREAM_TIMEOUT,
    DEFAULT_UPSTREAM_TOTAL_TIMEOUT,
    OPENAI_UPSTREAM,
)
from .explain import COMMAND_LINE, OptionSpelling
from .fingerprints import FingerprintChoice, FingerprintPolicy
from .modes import Mode
from .routes import SequencePolicy
from .rules import Rules

__all__ = [
    "DEFAULT_CACHE_MB", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_MAX_ANSWER", "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_CONNECTIONS", "DEFAULT_PORT", "DEFAULT_UPSTREAM_TIMEOUT",
    "DEFAULT_UPSTREAM_TOTAL_TIMEOUT", "OPENAI_UPSTREAM", "ReplayTiming", "Settings",
    "parse_age",
]


@dataclass(frozen=True)
class ReplayTiming:
    """How fast recorded streams are replayed: 0 = at once, 1.0 = as recorded, 2.0 = twice as fast."""

    speed: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ReplayTiming:
        value = text.strip().lower()
        if value == "none":
            return cls(0.0)
        if value == "recorded":
            return cls(1.0)
        match = re.fullmatch(r"(\d+(?:\.\d+)?)x", value)
        if match and float(match.group(1)) > 0:
            return cls(float(match.group(1)))
        raise ValueError(f"replay timing {text!r}: use none, recorded, or a speed such as 2x")


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` (or a plain number of seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"age {text!r}: use a number with a unit, such as 30d, 12h or 90m")
    return float(match.group(1)) * _AGE_UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class Settings:
    cassettes: Path = Path("cassettes")
    store: str | None = None  # None: the directory store on `cassettes`
    mode: Mode = Mode.AUTO
    default_cassette: str = "default"
    openai_upstream: str = OPENAI_UPSTREAM
    azure_upstream: str | None = None
    openai_api_key: str | None = None
    azure_api_key: str | None = None
    record_errors: bool = False
    key_policy: KeyPolicy = field(default_factory=KeyPolicy)
    max_body: int = DEFAULT_MAX_BODY
    fingerprint: FingerprintChoice = FingerprintPolicy.PINNED
    replay_timing: ReplayTiming = field(default_factory=ReplayTiming)
    inject_seed: int | None = None
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT  # seconds without upstream data
    upstream_total_timeout: float = DEFAULT_UPSTREAM_TOTAL_TIMEOUT  # seconds for one whole call
    max_answer: int = DEFAULT_MAX_ANSWER  # bytes of one answer that may be stored
    cache_mb: int = DEFAULT_CACHE_MB  # memory for cached entries and replies
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # seconds for a client to send a request head
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open client connections; past it, 503
    auth_token: str | None = None
    sequence: SequencePolicy = SequencePolicy.STATEFUL
    # One run (and default session) shared by every worker of one `serve`; None: a new one.
    run_id: str | None = None
    max_age: float | None = None  # seconds: older recordings are stale (--max-age)
    # Matching rules of particular cassettes, added to key_policy's for their requests.
    cassette_rules: tuple[tuple[str, Rules], ...] = ()
    # How advice in a miss names an option: the flag to the CLI's user, the option to pytest's.
    option_spelling: OptionSpelling = COMMAND_LINE

    def policy_for(self, cassette: str) -> KeyPolicy:
        """How requests of `cassette` are keyed: the shared policy, plus its own rules."""
        for name, rules in self.cassette_rules:
            if name == cassette:
                return replace(self.key_policy, rules=self.key_policy.rules.merged(rules))
        return self.key_policy

    @property
    def store_spec(self) -> str:
        return self.store or str(self.cassettes)
