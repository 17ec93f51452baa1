"""The record modes, and `auto` resolved from the environment. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Mode(StrEnum):
    RECORD = "record"  # replay hits, forward and store misses
    REPLAY = "replay"  # replay hits, refuse misses: never reaches upstream
    PASSTHROUGH = "passthrough"  # forward everything, store nothing
    REFRESH = "refresh"  # forward everything, store each answer and compare it to the pinned one
    AUTO = "auto"  # replay when CI is set, record otherwise


def is_ci(environ: Mapping[str, str]) -> bool:
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_mode(mode: Mode, environ: Mapping[str, str]) -> Mode:
    if mode is Mode.AUTO:
        return Mode.REPLAY if is_ci(environ) else Mode.RECORD
    return mode
